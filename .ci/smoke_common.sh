# Shared by the smoke scripts (sourced, not run): a scratch folder removed on exit with a passed/FAILED line
# naming the script ($SMOKE), and the commands' echo. Expects `set -euo pipefail` and START=$SECONDS set.
TMP="$(mktemp -d "${TMPDIR:-/tmp}/edgecompress-$SMOKE.XXXXXX")"
finish() {
    local rc=$?
    rm -rf "$TMP"
    echo "$SMOKE: $([ $rc -eq 0 ] && echo passed || echo "FAILED (exit $rc)"), wall time $((SECONDS - START)) s"
}
trap finish EXIT
run() {  # print the command, then run it
    printf '+'; printf ' %q' "$@"; printf '\n'
    "$@"
}
step() { echo; echo "== [$((SECONDS - START)) s] $*"; }
