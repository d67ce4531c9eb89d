#!/usr/bin/env bash
# Build the container images with podman, without pulling anything.
#
#   scripts/build_images.sh [serving|serving-slim|pipeline|all|base]      (default: serving)
#
# `base` builds only the base image and prints its name (the container tests use it to check
# that this machine can run containers at all before building anything big).
#
# No image registry can be reached from these machines, so:
#   1. the base image is a Debian bookworm rootfs made here with debootstrap (python3.11 and
#      CA certificates, docs/locales/apt lists stripped), imported with `podman import`;
#   2. pip inside the build cannot reach a package index, so the dependencies are resolved on
#      the host (`uv pip compile` against constraints.txt) and downloaded into a wheelhouse
#      (host = linux x86_64, glibc 2.36, CPython 3.11: the same wheel tags as the image);
#   3. the build context is staged under .local/images/context/<image>/: the lock file, the
#      wheelhouse (hard links), the uv binary, and the code that image ships (serving image:
#      serving/server only, in both serving images; pipeline image: ml/ and serving/).
# The Dockerfiles install the lock offline (uv, --no-index) in a layer that depends only on
# the lock, then copy the code: a code change rebuilds only the last layers.
#
# Cached under .local/images/ (gitignored), so a second build does no network I/O at all:
#   base-<recipe hash>.tar         the trimmed rootfs (also kept as an image in podman storage)
#   wheels/<image>-<deps hash>/    the lock + wheels; the hash covers constraints.txt, the
#                                  requirement list and the target platform
#
# Environment:
#   PODMAN         podman command (default: "podman --runtime runc"; see
#                  scripts/install_container_tools.sh for the machine setup)
#   IMAGES_CACHE   cache folder (default: .local/images)
#   SERVING_IMAGE  tag of the serving image (default: train-and-deploy/serving:latest)
#   SERVING_SLIM_IMAGE  tag of the slim serving image (default: train-and-deploy/serving-slim:latest)
#   PIPELINE_IMAGE tag of the pipeline image (default: train-and-deploy/pipeline:latest)
#   DEBIAN_MIRROR  debootstrap mirror (default: http://deb.debian.org/debian)
#   VENV           the project venv whose uv and pip are used (default: .venv; `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

WHAT=${1:-serving}
case "$WHAT" in serving | serving-slim | pipeline | all | base) ;; *)
    echo "usage: $0 [serving|serving-slim|pipeline|all|base]" >&2
    exit 2
    ;;
esac

read -r -a PODMAN <<<"${PODMAN:-podman --runtime runc}"
CACHE=${IMAGES_CACHE:-$REPO/.local/images}
SERVING_IMAGE=${SERVING_IMAGE:-train-and-deploy/serving:latest}
SERVING_SLIM_IMAGE=${SERVING_SLIM_IMAGE:-train-and-deploy/serving-slim:latest}
PIPELINE_IMAGE=${PIPELINE_IMAGE:-train-and-deploy/pipeline:latest}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
VENV=${VENV:-$REPO/.venv}
UV=$VENV/bin/uv
PY=$VENV/bin/python
BASE_PACKAGES=python3,python3.11,ca-certificates

# What each image installs (resolved against constraints.txt, so versions match the tested set).
# serving: only what `python -m serving.server` imports: mlflow-skinny (MLflow's own client-only
# distribution: the pyfunc loader and the registry client, without the tracking server, Flask,
# SQLAlchemy, scikit-learn, scipy, matplotlib), TensorFlow (CPU), pandas, pyarrow (Parquet
# input), uvicorn with uvloop/httptools (the fast HTTP path), orjson, prometheus-client
# (/metrics).
SERVING_REQUIREMENTS="mlflow-skinny tensorflow-cpu pandas numpy pyarrow
uvicorn uvloop httptools orjson prometheus-client"
# serving-slim: the same server for models with a LiteRT artifact (serving/server/slim.py): the
# LiteRT runtime instead of TensorFlow, and no pyarrow (only Parquet request bodies need it).
SLIM_REQUIREMENTS="mlflow-skinny ai-edge-litert pandas numpy
uvicorn uvloop httptools orjson prometheus-client"
# pipeline: what training, evaluation and the Kubernetes rollout pods run (`python -m ml ...`,
# `python -m serving.deploy rollout`): the project's dependencies without Airflow.
pipeline_requirements() {
    "$PY" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    name = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower()
    if not name.startswith("apache-airflow"):
        print(dep)
print("kubernetes")
print("uvicorn\nuvloop\nhttptools")
EOF
}

log() { printf '[build_images %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
hash_of() { sha256sum | cut -c1-12; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

for tool in "${PODMAN[0]}" debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "build_images: $tool not found: run scripts/install_container_tools.sh" >&2
        exit 1
    }
done
if [ ! -x "$UV" ] || [ ! -x "$PY" ]; then
    echo "build_images: $VENV has no uv/python: run 'make install' first" >&2
    exit 1
fi
mkdir -p "$CACHE/wheels" "$CACHE/context"
# One build at a time per cache (the staged contexts and wheelhouses are shared).
exec 9>"$CACHE/.lock"
flock 9

# -- 1. base image -----------------------------------------------------------------------------
make_base_rootfs() { # $1: target dir
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$1" "$DEBIAN_MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1 || {
        tail -20 "$CACHE/debootstrap.log" >&2
        return 1
    }
    # Nothing in the images runs apt: drop its lists and caches, docs, man pages, locales.
    rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/cache/debconf/*-old \
        "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/info/* "$1"/usr/share/locale/* \
        "$1"/usr/share/python-wheels "$1"/var/log/* "$1"/tmp/* "$1"/root/.cache
    # Reproducible-ish: no machine id, no per-build resolv.conf/hostname.
    : >"$1"/etc/machine-id
    rm -f "$1"/etc/resolv.conf "$1"/etc/hostname
}
BASE_KEY=$({
    declare -f make_base_rootfs
    echo "$BASE_PACKAGES $DEBIAN_MIRROR bookworm"
} | hash_of)
BASE_IMAGE=localhost/train-and-deploy/base:$BASE_KEY
BASE_TAR=$CACHE/base-$BASE_KEY.tar

if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    log "base: $BASE_IMAGE (cached image)"
else
    t0=$(now)
    if [ ! -f "$BASE_TAR" ]; then
        log "base: debootstrap bookworm ($BASE_PACKAGES) ..."
        rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        trap 'rm -rf "$rootfs"' EXIT
        make_base_rootfs "$rootfs"
        tar --numeric-owner -C "$rootfs" -cf "$BASE_TAR.part" .
        mv "$BASE_TAR.part" "$BASE_TAR"
        rm -rf "$rootfs"
        trap - EXIT
        rm -f "$CACHE"/base-*.tar.part
    fi
    "${PODMAN[@]}" import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_IMAGE" >/dev/null
    log "base: $BASE_IMAGE built in $(elapsed "$t0")s"
fi
# Old base tarballs are dead weight once the recipe changed.
find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "base-$BASE_KEY.tar" -delete
if [ "$WHAT" = base ]; then
    echo "$BASE_IMAGE"
    exit 0
fi

# -- 2. wheelhouse -----------------------------------------------------------------------------
wheelhouse() { # $1: image name; requirements on stdin. Prints the wheelhouse dir.
    local name=$1 reqs key dir
    reqs=$(cat)
    key=$({
        echo "$reqs"
        cat constraints.txt
        echo "cp311 linux_x86_64 glibc2.36"
    } | hash_of)
    dir=$CACHE/wheels/$name-$key
    if [ -f "$dir/.complete" ]; then
        log "$name: wheelhouse $dir (cached)"
    else
        local t0
        t0=$(now)
        rm -rf "$dir" && mkdir -p "$dir"
        echo "$reqs" >"$dir/requirements.in"
        # Lock: the full pinned closure, versions from constraints.txt.
        "$UV" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
            --constraint constraints.txt --no-header --no-annotate \
            -o "$dir/requirements.txt" "$dir/requirements.in" || return 1
        # The host has the image's wheel tags, so pip picks the same files the image needs;
        # a package that only has an sdist is built into a wheel here. --ignore-requires-python:
        # uv ignores Requires-Python upper bounds when it resolves (and installs, in the image),
        # so pip must fetch what uv chose (ai-edge-litert needs backports-strenum, whose 1.3.1
        # says <3.11); `pip wheel` does not honour that flag (pip 23.2), `pip download` does.
        # `|| return 1`: errexit does not apply here (command substitution), and a failed
        # download must not leave a wheelhouse marked complete.
        "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
            --ignore-requires-python -r "$dir/requirements.txt" -d "$dir" \
            2> >(grep -v 'is ignored: it is neither' >&2) || return 1
        local sdist
        for sdist in "$dir"/*.tar.gz "$dir"/*.zip; do
            [ -e "$sdist" ] || continue
            "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps "$sdist" -w "$dir" \
                2> >(grep -v 'is ignored: it is neither' >&2) || return 1
            rm -f "$sdist"
        done
        touch "$dir/.complete"
        log "$name: wheelhouse $(find "$dir" -name '*.whl' | wc -l) wheels," \
            "$(du -sh "$dir" | cut -f1) in $(elapsed "$t0")s"
        # Keep only the current wheelhouse of this image.
        # (12 ?: the hash, so that "serving" never matches "serving-slim-<hash>".)
        find "$CACHE/wheels" -maxdepth 1 -name "$name-????????????" ! -name "$name-$key" \
            -exec rm -rf {} +
    fi
    echo "$dir"
}

# -- 3. context + build -------------------------------------------------------------------------
build() { # $1: image name, $2: tag, $3: wheelhouse dir, $4...: code paths to ship
    local name=$1 tag=$2 wheels=$3 ctx t0 sha
    shift 3
    local code=("$@")
    ctx=$CACHE/context/$name
    t0=$(now)
    rm -rf "$ctx" && mkdir -p "$ctx/tools"
    cp -al "$wheels" "$ctx/wheels" 2>/dev/null || cp -a "$wheels" "$ctx/wheels"
    cp "$wheels/requirements.txt" "$ctx/requirements.txt"
    ln -f "$(readlink -f "$UV")" "$ctx/tools/uv" 2>/dev/null ||
        cp "$(readlink -f "$UV")" "$ctx/tools/uv"
    cp docker/.dockerignore "$ctx/.dockerignore"
    # The code: only the packages this image ships, no caches (COPY layers are keyed by
    # content, not mtime).
    tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - "${code[@]}" | tar -C "$ctx" -xf -
    sha=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    # Uncommitted changes: the version names their content, so two different edits never
    # share one (the pipeline's unchanged check compares code versions).
    if [ -n "$(git status --porcelain -- "${code[@]}" 2>/dev/null)" ]; then
        sha="$sha-dirty.$(tar -C "$ctx" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
            -cf - "${code[@]}" | sha256sum | cut -c1-12)"
    fi
    log "$name: podman build -> $tag (code $sha)"
    # BUILD_VERBOSE=1 shows each step (and whether it came from the layer cache).
    "${PODMAN[@]}" build --layers --format docker \
        -f "docker/$name.Dockerfile" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg GIT_SHA="$sha" \
        --iidfile "$CACHE/$name.iid" -t "$tag" "$ctx" >"$CACHE/$name.build.log" 2>&1 || {
        tail -40 "$CACHE/$name.build.log" >&2
        echo "build_images: $name build failed (full log: $CACHE/$name.build.log)" >&2
        return 1
    }
    if [ -n "${BUILD_VERBOSE:-}" ]; then cat "$CACHE/$name.build.log" >&2; fi
    # Earlier builds of this image (untagged now) and their own layers; the layers the new
    # image shares with them (base, dependencies) stay, so the cache is kept.
    "${PODMAN[@]}" image prune --force --filter "label=io.train-and-deploy.image=$name" \
        >/dev/null 2>&1 || true
    local size
    size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$tag")
    log "$name: built $tag ($(sed 's/^sha256://' "$CACHE/$name.iid" | cut -c1-12)," \
        "$((size / 1000000)) MB) in $(elapsed "$t0")s"
}

if [ "$WHAT" = serving ] || [ "$WHAT" = all ]; then
    dir=$(echo "$SERVING_REQUIREMENTS" | tr ' ' '\n' | sed '/^$/d' | wheelhouse serving)
    # The model server package and nothing else: no ml/, no serving/deploy/.
    build serving "$SERVING_IMAGE" "$dir" serving/__init__.py serving/server
fi
if [ "$WHAT" = serving-slim ] || [ "$WHAT" = all ]; then
    dir=$(echo "$SLIM_REQUIREMENTS" | tr ' ' '\n' | sed '/^$/d' | wheelhouse serving-slim)
    build serving-slim "$SERVING_SLIM_IMAGE" "$dir" serving/__init__.py serving/server
fi
if [ "$WHAT" = pipeline ] || [ "$WHAT" = all ]; then
    dir=$(pipeline_requirements | wheelhouse pipeline)
    build pipeline "$PIPELINE_IMAGE" "$dir" ml serving
fi
