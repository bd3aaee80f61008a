"""Chat with an edgecompress artifact using only the runtime (onnxruntime, numpy, tokenizers, jinja2).

    python examples/python/chat.py out/smollm2-135m-cpu-x86 [--max-new-tokens 256] [--system TEXT]

Type a message and press Enter; an empty line or Ctrl-D ends the chat. Replies are greedy and stream as
they are generated; the conversation so far goes back through the chat template every turn.
"""

import argparse
import sys

from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.generate import TextGenerator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--ids", action="store_true", help="also print each reply's token ids")
    args = parser.parse_args()
    try:
        model = TextGenerator(args.artifact)
    except ArtifactRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        reply = model.generate(messages=messages, max_new_tokens=args.max_new_tokens,
                               on_text=lambda piece: print(piece, end="", flush=True))
        print()
        if args.ids:
            print("ids:", " ".join(map(str, reply.tokens)))
        messages.append({"role": "assistant", "content": reply.text})


if __name__ == "__main__":
    sys.exit(main())
