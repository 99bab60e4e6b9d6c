# Sourced by scripts/bootstrap.sh and scripts/bootstrap-test.sh.
# apt_install WHO PACKAGE...: installs the Debian packages named (those found missing), or
# stops with the list when not root. Nothing to do without packages.
apt_install() {
    local who=$1
    shift
    [ $# -gt 0 ] || return 0
    if [ "$(id -u)" != 0 ]; then
        echo "$who: missing system packages: $* (install them, or run as root)" >&2
        exit 1
    fi
    echo "$who: installing $*" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
