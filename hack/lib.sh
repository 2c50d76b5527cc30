# Sourced by the hack/ scripts, from the repository's root.
#
# `sudo hack/…` on a machine where rustup lives in the invoking user's home: sudo resets PATH,
# so cargo is found in that home, and whatever this run creates there or in target/ and .venv/
# is given back to that user when it ends (`give_back`), so their own builds keep working.

if [ "$(id -u)" = 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] \
  && ! command -v cargo >/dev/null 2>&1; then
  invoker_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
  if [ -n "$invoker_home" ] && [ -x "$invoker_home/.cargo/bin/cargo" ]; then
    export PATH="$invoker_home/.cargo/bin:$PATH"
    export CARGO_HOME="${CARGO_HOME:-$invoker_home/.cargo}"
    export RUSTUP_HOME="${RUSTUP_HOME:-$invoker_home/.rustup}"
  fi
fi

# Gives back to the sudo invoker what root created in their cargo home, target/ and .venv/.
give_back() {
  if [ "$(id -u)" = 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    local dirs=(target .venv)
    [ -n "${invoker_home:-}" ] && dirs+=("$CARGO_HOME" "$RUSTUP_HOME")
    for d in "${dirs[@]}"; do
      [ -e "$d" ] && find "$d" -xdev -uid 0 -exec chown -h "$SUDO_USER:" {} + 2>/dev/null
    done
  fi
  return 0
}

# Installs Debian's package PKG unless the program PROG is there: `require_program PROG PKG WHY`.
require_program() {
  if [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] || command -v "$1" >/dev/null 2>&1; then
    return 0
  fi
  echo "==> installing $2 ($1, $3)" >&2
  if command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq "$2"
  else
    echo "error: $1 not found: install $2" >&2
    exit 1
  fi
}

# What the tests run besides the project's own programs: mke2fs formats cache volumes' images;
# ip makes the network namespaces the fleet runs in (the peer tier's tests and benchmark).
require_system_tools() {
  require_program mke2fs e2fsprogs "for cache volumes"
  require_program ip iproute2 "for network namespaces"
}

require_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found on PATH${SUDO_USER:+ nor in ~$SUDO_USER/.cargo/bin}: install Rust with rustup (https://rustup.rs)" >&2
    exit 1
  fi
}

# Makes .venv/ (the project's own Python environment, never the system's) hold the packages the
# requirement files name, and puts it first on PATH. pip shows what it downloads and how big.
python_env() {
  if [ ! -x .venv/bin/python3 ]; then
    echo "==> creating .venv, the tests' own Python environment" >&2
    if ! python3 -m venv .venv >/dev/null 2>&1; then
      rm -rf .venv
      # Debian and Ubuntu ship venv apart from python3.
      if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3-venv
      fi
      python3 -m venv .venv
    fi
  fi
  export VIRTUAL_ENV="$PWD/.venv"
  export PATH="$VIRTUAL_ENV/bin:$PATH"
  local stamp
  stamp=".venv/.installed-$(cat "$@" | sha256sum | cut -c1-16)"
  if [ ! -e "$stamp" ]; then
    echo "==> installing Python packages into .venv from $*" >&2
    local req
    for req in "$@"; do
      case $req in
        # Only the files of these: not their dependencies.
        *nodeps*) python3 -m pip install --disable-pip-version-check --no-deps -r "$req" ;;
        *) python3 -m pip install --disable-pip-version-check -r "$req" ;;
      esac
    done
    touch "$stamp"
    echo "==> .venv holds $(du -sh .venv | cut -f1)" >&2
  fi
}

# Builds the release binaries (cargo shows its progress) and runs target/release/$1 with the
# other arguments, giving back what the build made first.
run_release() {
  local program=$1
  shift
  require_cargo
  echo "==> building (release; the first build takes several minutes)" >&2
  cargo build --release --workspace --bins
  give_back
  exec "target/release/$program" "$@"
}
