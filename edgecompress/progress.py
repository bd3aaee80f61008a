"""What a build tells the outside world, stage by stage: the CLI renders it, the API's default is silent.

Its own module (no imports) so that the CLI and the API name it without loading the build pipeline, which a
runtime-only install does not have.
"""


class Progress:
    def stage_started(self, name: str) -> None: ...

    def stage_note(self, name: str, message: str) -> None: ...

    def stage_finished(self, name: str, seconds: float) -> None: ...

    def warning(self, message: str) -> None: ...
