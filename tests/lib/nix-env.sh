# Sourced (bash) by every script of this project that runs real Nix: tests/oracle/nix-oracle.sh
# and bench/*.sh. The shell twin of crates/larder-testkit/src/nix.rs; keep the two alike.
#
# After sourcing, Nix sees no configuration but $NIX_CONFIG, whatever the machine:
# - `sandbox = false`: Nix 2.8 sandboxes builds wherever user namespaces work, and inside
#   Debian's sandbox /bin/sh (every test derivation's builder) does not exist; where namespaces
#   do not work, Nix silently builds unsandboxed. Say it, so both kinds of machine agree.
# - no machine-wide nix.conf or netrc (NIX_CONF_DIR is an empty directory), no user nix.conf
#   (NIX_USER_CONF_FILES is empty), no daemon (NIX_REMOTE unset: root opens the store itself);
# - no build users, no substituters (nothing can be fetched here; a script names its own).
# A script adds its own settings with: NIX_CONFIG+=$'\n'"name = value".
LARDER_NIX_CONFIG=$'build-users-group =\nsandbox = false\nexperimental-features = nix-command\nsubstituters ='
export NIX_CONFIG=$LARDER_NIX_CONFIG
LARDER_EMPTY_NIX_CONF_DIR=${TMPDIR:-/tmp}/larder-tests-empty-nix-conf-dir
mkdir -p "$LARDER_EMPTY_NIX_CONF_DIR"
if [ -n "$(ls -A "$LARDER_EMPTY_NIX_CONF_DIR")" ]; then
  echo "nix-env.sh: $LARDER_EMPTY_NIX_CONF_DIR must stay empty (it is the tests' NIX_CONF_DIR); remove what is in it" >&2
  return 1 2>/dev/null || exit 1
fi
export NIX_CONF_DIR=$LARDER_EMPTY_NIX_CONF_DIR
export NIX_USER_CONF_FILES=
unset NIX_REMOTE
