# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run): errors, and --dry-run printing.

# Prints "SCRIPT: message" to stderr and exits 2 (bad arguments; nothing has run).
die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# A word as the shell would read it back: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs the command, or with dry_run=1 prints it (each word quoted) instead.
run() {
  if [[ "${dry_run:-0}" == 1 ]]; then
    local out="" word
    for word in "$@"; do out+="$(quote "$word") "; done
    echo "${out% }"
  else
    "$@"
  fi
}
