#!/usr/bin/env bash
# Builds helix's sandbox images without an image registry, from Debian packages only:
#
#   helix-sandbox-python:latest   Debian (the host's release) made with mmdebstrap:
#                                 python3, pytest, procps; user sandbox (1000:1000)
#   helix-sandbox-busybox:latest  Debian's busybox-static and nothing else
#
# Both are imported with `docker import` and run as USER 1000:1000 in WORKDIR /workspace.
# Each image carries the label helix.recipe=<sha256 of this script, python.Dockerfile and the
# Debian codename>; an image whose label matches is left alone, so a second run costs a
# couple of `docker image inspect` calls.
#
# Usage: docker/build-offline.sh [--force] [--only python|busybox]
#
# Debian packages come from the mirrors configured in the host's own apt sources
# (/etc/apt/sources.list and /etc/apt/sources.list.d/), read at run time.
# Building needs root (mmdebstrap's root mode, chown of the busybox rootfs); checking does not.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
DOCKERFILE="$SCRIPT_DIR/python.Dockerfile"
cd "$SCRIPT_DIR"

PYTHON_IMAGE=helix-sandbox-python:latest
BUSYBOX_IMAGE=helix-sandbox-busybox:latest
SANDBOX_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Packages on top of Debian's Essential:yes set (which already brings bash, dash as /bin/sh,
# coreutils, tar, gzip, grep, sed, findutils, util-linux). procps adds kill and ps.
PYTHON_PACKAGES=python3,python3-pytest,procps

log() { printf 'build-offline: %s\n' "$*" >&2; }
die() { printf 'build-offline: error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<'EOF'
Usage: docker/build-offline.sh [--force] [--only python|busybox]

Builds helix-sandbox-python:latest and helix-sandbox-busybox:latest from Debian packages,
without an image registry. Images that are up to date (same helix.recipe label) are skipped.

  --force                 rebuild even if the image is up to date
  --only python|busybox   build only one of the two images
  -h, --help              show this help
EOF
}

force=0
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --only) [ $# -ge 2 ] || die "--only needs an argument: python or busybox"; only="$2"; shift ;;
        --only=*) only="${1#--only=}" ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
case "$only" in
    ""|python|busybox) ;;
    *) die "--only takes python or busybox, not '$only'" ;;
esac

# ---------------------------------------------------------------------------------------------
# Preconditions

command -v docker >/dev/null 2>&1 || die "the docker command is not installed"
if ! docker_err="$(docker version --format '{{.Server.Version}}' 2>&1 >/dev/null)"; then
    die "cannot reach the Docker daemon (is it running, and may this user use it?): ${docker_err##*$'\n'}"
fi

[ -r /etc/os-release ] || die "/etc/os-release is missing: cannot tell the host's Debian release"
# shellcheck disable=SC1091
CODENAME="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
[ -n "$CODENAME" ] || die "/etc/os-release has no VERSION_CODENAME: this script needs a Debian host"
[ -r "$DOCKERFILE" ] || die "$DOCKERFILE is missing"

RECIPE="$(cat "$SCRIPT" "$DOCKERFILE" <(printf '%s\n' "$CODENAME") | sha256sum | cut -d' ' -f1)"

TMP=""
cleanup() {
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

workdir() {
    if [ -z "$TMP" ]; then
        TMP="$(mktemp -d "${TMPDIR:-/tmp}/helix-sandbox-build.XXXXXX")"
        # apt-get download drops privileges to _apt, which must be able to enter the directory.
        chmod 0755 "$TMP"
    fi
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "building $1 needs root (mmdebstrap root mode, chown of the rootfs); re-run as root"
}

apt_install() {
    need_root "$*"
    log "installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "$@" >&2; then
        apt-get update >&2
        apt-get install -y --no-install-recommends "$@" >&2
    fi
}

image_label() {  # image -> its helix.recipe label, empty if the image does not exist
    docker image inspect --format '{{ index .Config.Labels "helix.recipe" }}' "$1" 2>/dev/null || true
}

image_id() {
    docker image inspect --format '{{ .Id }}' "$1" 2>/dev/null || true
}

image_size() {  # image -> "12.3 MiB"
    docker image inspect --format '{{ .Size }}' "$1" | awk '{ printf "%.1f MiB", $1 / 1048576 }'
}

up_to_date() {
    [ "$force" -eq 0 ] && [ "$(image_label "$1")" = "$RECIPE" ]
}

# docker import TARBALL as IMAGE with the sandbox's runtime settings; removes the image that the
# tag pointed to before, so that rebuilding leaves no dangling images behind.
import_rootfs() {
    local tarball="$1" image="$2" kind="$3"
    shift 3
    local old new
    old="$(image_id "$image")"
    log "importing $image"
    new="$(docker import \
        --message "helix sandbox image ($kind), built by docker/build-offline.sh" \
        --change 'USER 1000:1000' \
        --change 'WORKDIR /workspace' \
        --change "ENV PATH=$SANDBOX_PATH" \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV HOME=/home/sandbox' \
        "$@" \
        --change "LABEL helix.recipe=$RECIPE helix.image=$kind org.opencontainers.image.title=${image%%:*}" \
        --change 'CMD ["/bin/sh"]' \
        "$tarball" "$image")"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
}

# ---------------------------------------------------------------------------------------------
# Debian sources, from the host's apt configuration

# Prints one-line "deb [signed-by=…] URI SUITE main" entries for the host's Debian release
# (CODENAME, CODENAME-updates, CODENAME-security), from both one-line .list files and deb822
# .sources files. Entries for other suites (third-party repositories) are left out.
host_debian_sources() {
    local files=() f
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    awk -v codename="$CODENAME" '
        function wanted(suite) {
            return suite == codename || suite == codename "-updates" || suite == codename "-security" || suite == codename "/updates"
        }
        function emit(uri, suite, signedby) {
            sub(/\/+$/, "", uri)
            if (!wanted(suite) || uri == "" || seen[uri " " suite]++) return
            if (signedby != "") print "deb [signed-by=" signedby "] " uri " " suite " main"
            else print "deb " uri " " suite " main"
        }
        function flush(   i, j, nu, ns, u, s) {
            if (types ~ /(^|[ \t])deb($|[ \t])/ && tolower(enabled) != "no") {
                nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
                for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) emit(u[i], s[j], signed)
            }
            types = uris = suites = signed = enabled = ""
        }
        FNR == 1 { if (deb822) flush(); deb822 = (FILENAME ~ /\.sources$/) }
        deb822 {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^#/ || $0 ~ /^[ \t]/) next
            key = tolower($0); sub(/:.*/, "", key)
            val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "enabled") enabled = val
            else if (key == "signed-by" && val ~ /^\//) signed = val
            next
        }
        {
            sub(/#.*/, "")
            if ($1 != "deb") next
            i = 2; signed = ""
            if ($2 ~ /^\[/) {
                while (i <= NF) {
                    if ($i ~ /^\[?signed-by=/) { signed = $i; sub(/^\[?signed-by=/, "", signed); sub(/\]$/, "", signed) }
                    if ($i ~ /\]$/) { i++; break }
                    i++
                }
            }
            emit($i, $(i + 1), signed)
        }
        END { if (deb822) flush() }
    ' "${files[@]}"
}

# Proxy settings of the host's apt, passed on to the apt that mmdebstrap runs.
host_apt_proxy_opts() {
    local key value
    for key in Acquire::http::Proxy Acquire::https::Proxy; do
        value=""
        eval "$(apt-config shell value "$key" 2>/dev/null || true)"
        if [ -n "$value" ]; then
            printf -- '--aptopt=%s "%s"\n' "$key" "$value"
        fi
    done
}

# ---------------------------------------------------------------------------------------------
# helix-sandbox-python

build_python() {
    need_root "$PYTHON_IMAGE"
    command -v mmdebstrap >/dev/null 2>&1 || apt_install mmdebstrap
    workdir

    local sources=() aptopts=() line
    while IFS= read -r line; do sources+=("$line"); done < <(host_debian_sources)
    [ ${#sources[@]} -gt 0 ] ||
        die "no Debian '$CODENAME' source found in /etc/apt/sources.list or /etc/apt/sources.list.d/"
    while IFS= read -r line; do aptopts+=("$line"); done < <(host_apt_proxy_opts)
    log "Debian sources for $CODENAME:"
    for line in "${sources[@]}"; do log "  $line"; done

    # Runs in the finished chroot before mmdebstrap packs it: adds the sandbox user, the home
    # and workspace directories, and strips what a sandbox never reads.
    cat >"$TMP/python-customize.sh" <<'EOF'
#!/bin/sh
set -eu
root="$1"
grep -q '^sandbox:' "$root/etc/group" || echo 'sandbox:x:1000:' >>"$root/etc/group"
grep -q '^sandbox:' "$root/etc/passwd" ||
    echo 'sandbox:x:1000:1000:helix sandbox:/home/sandbox:/bin/sh' >>"$root/etc/passwd"
if [ -f "$root/etc/shadow" ] && ! grep -q '^sandbox:' "$root/etc/shadow"; then
    echo 'sandbox:*:19000:0:99999:7:::' >>"$root/etc/shadow"
fi
if [ -f "$root/etc/gshadow" ] && ! grep -q '^sandbox:' "$root/etc/gshadow"; then
    echo 'sandbox:*::' >>"$root/etc/gshadow"
fi
install -d -o 1000 -g 1000 -m 0755 "$root/home/sandbox" "$root/workspace"
# Docker provides these at run time; the host's copies must not end up in the image.
rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
# Documentation, translations and logs (copyright files stay).
find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/lintian" \
    "$root/usr/share/linda" "$root/usr/share/bug"
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
rm -rf "$root/var/cache/apt" "$root/var/lib/apt/lists" "$root/var/cache/debconf"/*-old \
    "$root/var/lib/dpkg"/*-old
find "$root/var/log" -type f -delete
EOF
    chmod 0755 "$TMP/python-customize.sh"

    # Bookworm's essential set is not merged-/usr by itself; without this hook mmdebstrap
    # installs usrmerge, which drags in ~45 MiB of perl. The hook merges /usr the way
    # debootstrap does, and does nothing on releases that need no help.
    local hookdirs=() hookdir=/usr/share/mmdebstrap/hooks/maybe-merged-usr
    [ -d "$hookdir" ] && hookdirs+=(--hook-dir="$hookdir")

    log "building $PYTHON_IMAGE: mmdebstrap $CODENAME, variant essential + $PYTHON_PACKAGES"
    local started=$SECONDS
    # The path-excludes keep docs out of the packages that dpkg installs; the hook above also
    # cleans the Essential:yes packages, which mmdebstrap unpacks before dpkg is configured.
    # TMPDIR is cleared for hooks by mmdebstrap, so the hook is given by absolute path.
    mmdebstrap \
        --mode=root \
        --variant=essential \
        --include="$PYTHON_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --aptopt='Acquire::Languages "none"' \
        "${aptopts[@]}" \
        "${hookdirs[@]}" \
        --customize-hook="$TMP/python-customize.sh" \
        --format=tar \
        "$CODENAME" "$TMP/python-rootfs.tar" "${sources[@]}"
    log "rootfs tarball: $(du -m "$TMP/python-rootfs.tar" | cut -f1) MiB"

    import_rootfs "$TMP/python-rootfs.tar" "$PYTHON_IMAGE" python \
        --change 'ENV PYTHONDONTWRITEBYTECODE=1'
    rm -f "$TMP/python-rootfs.tar"
    log "built $PYTHON_IMAGE in $((SECONDS - started)) s, size $(image_size "$PYTHON_IMAGE")"
}

# ---------------------------------------------------------------------------------------------
# helix-sandbox-busybox

build_busybox() {
    need_root "$BUSYBOX_IMAGE"
    workdir
    local started=$SECONDS
    log "building $BUSYBOX_IMAGE from Debian's busybox-static"

    mkdir -p "$TMP/busybox-deb"
    # apt-get download fetches as the _apt user when it can write the target directory.
    chown _apt "$TMP/busybox-deb" 2>/dev/null || true
    if ! (cd "$TMP/busybox-deb" && apt-get download busybox-static >&2); then
        log "apt-get download failed; updating the package lists and trying again"
        apt-get update >&2
        (cd "$TMP/busybox-deb" && apt-get download busybox-static >&2)
    fi
    local deb
    deb="$(find "$TMP/busybox-deb" -maxdepth 1 -name 'busybox-static_*.deb' -print -quit)"
    [ -n "$deb" ] || die "apt-get download busybox-static produced no .deb"
    log "using $(basename "$deb")"
    dpkg-deb -x "$deb" "$TMP/busybox-pkg"

    local bin
    bin="$(find "$TMP/busybox-pkg" -type f -name busybox -perm -u+x -print -quit)"
    [ -n "$bin" ] || die "no busybox binary in $(basename "$deb")"

    local root="$TMP/busybox-rootfs"
    install -d -m 0755 "$root" "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" \
        "$root/etc" "$root/dev" "$root/proc" "$root/sys" "$root/var"
    install -d -m 0700 "$root/root"
    install -d -m 1777 "$root/tmp" "$root/var/tmp"
    install -d -o 1000 -g 1000 -m 0755 "$root/home/sandbox" "$root/workspace"
    install -m 0755 "$bin" "$root/bin/busybox"

    # One symlink per applet at the path busybox itself reports (bin/sh, usr/bin/tar, ...).
    local applet count=0
    while IFS= read -r applet; do
        applet="${applet#/}"
        case "$applet" in ""|bin/busybox) continue ;; esac
        mkdir -p "$root/$(dirname "$applet")"
        [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
        count=$((count + 1))
    done < <("$root/bin/busybox" --list-full)
    [ -L "$root/bin/sh" ] || die "busybox has no sh applet"
    log "$count applets linked"

    cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
sandbox:x:1000:1000:helix sandbox:/home/sandbox:/bin/sh
EOF
    cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
sandbox:x:1000:
EOF
    chmod 0644 "$root/etc/passwd" "$root/etc/group"

    tar --numeric-owner -C "$root" -cf "$TMP/busybox-rootfs.tar" .
    import_rootfs "$TMP/busybox-rootfs.tar" "$BUSYBOX_IMAGE" busybox
    log "built $BUSYBOX_IMAGE in $((SECONDS - started)) s, size $(image_size "$BUSYBOX_IMAGE")"
}

# ---------------------------------------------------------------------------------------------

log "recipe $RECIPE (Debian $CODENAME)"
for kind in python busybox; do
    [ -z "$only" ] || [ "$only" = "$kind" ] || continue
    if [ "$kind" = python ]; then image=$PYTHON_IMAGE; else image=$BUSYBOX_IMAGE; fi
    if up_to_date "$image"; then
        log "$image is up to date ($(image_size "$image"))"
    else
        "build_$kind"
    fi
done
