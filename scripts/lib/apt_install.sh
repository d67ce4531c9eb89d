# Sourced by the scripts/install_*.sh installers: `apt_install WHO PACKAGE...`.
#
# Installs Debian packages without starting any service they ship: where no policy-rc.d exists,
# one that answers 101 ("action forbidden") is put in place for the install and removed after.
# No recommended packages. Needs root or sudo and apt-get; returns non-zero (with a message
# that starts with WHO) when it cannot install.

apt_install() {
    local who=$1
    shift
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "$who: needs root (or sudo)" >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$who: no apt-get here: install $* by hand" >&2
        return 1
    fi
    local policy=/usr/sbin/policy-rc.d ours=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# %s: start no service while installing.\nexit 101\n' "$who" |
            $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        ours=1
    fi
    echo "$who: apt-get install $*"
    local status=0
    {
        DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    } || status=$?
    if [ -n "$ours" ]; then $sudo rm -f "$policy"; fi
    return "$status"
}
