# Shared by scripts/build-images.sh (model images) and scripts/build-prod-images.sh (the
# production stack): images made without any container registry. Source it; needs bash.

CACHE=${RADDEPLOY_CACHE:-$HOME/.cache/raddeploy}
mkdir -p "$CACHE"

# debootstrap_image TAG NAME PACKAGES: a minimal Debian bookworm with PACKAGES (comma-separated),
# imported as TAG. The root file system is kept as $CACHE/NAME.tar: that tarball is what an
# air-gapped site copies in (`docker import NAME.tar TAG`; docs/install-airgapped.md). Another
# PACKAGES list makes both again: the image carries the list's hash as a label, the tarball
# has it beside it in NAME.packages.
debootstrap_image() {
  local tag=$1 name=$2 packages=$3
  local want have
  want=$(printf '%s' "$packages" | sha256sum | cut -c1-16)
  have=$(docker image inspect -f '{{ index .Config.Labels "org.raddeploy.packages" }}' "$tag" 2>/dev/null || true)
  [ "$have" = "$want" ] && return 0
  local tarball="$CACHE/$name.tar"
  if [ -s "$tarball" ] && [ "$(cat "$CACHE/$name.packages" 2>/dev/null || true)" != "$want" ] \
      && [ -e "$CACHE/$name.packages" ]; then
    rm -f "$tarball"  # made with another package list (a tarball copied in without its list is taken as is)
  fi
  if [ ! -s "$tarball" ]; then
    local root
    root=$(mktemp -d)
    echo "images: debootstrap of $tag with $packages (1-2 min)"
    # The same Debian mirror apt uses on this host (override with RADDEPLOY_DEBIAN_MIRROR).
    local mirror=${RADDEPLOY_DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
      | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)}
    # shellcheck disable=SC2086
    debootstrap --variant=minbase --include="$packages" bookworm "$root" $mirror >"$CACHE/$name.debootstrap.log" 2>&1 || {
      echo "images: debootstrap failed; see $CACHE/$name.debootstrap.log" >&2; rm -rf "$root"; return 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    echo "$want" >"$CACHE/$name.packages"
    rm -rf "$root"
  fi
  docker import --change "LABEL org.raddeploy.packages=$want" "$tarball" "$tag" >/dev/null
}

# inputs_digest WORD_OR_PATH...: a hash of the arguments and of the files under those that are
# paths (byte code left out), to label an image with what it was built from.
inputs_digest() {
  local paths=() arg
  for arg in "$@"; do [ -e "$arg" ] && paths+=("$arg"); done
  {
    printf '%s\n' "$@"
    [ ${#paths[@]} -eq 0 ] || find "${paths[@]}" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 \
      | LC_ALL=C sort -z | xargs -0 -r cat
  } | sha256sum | cut -c1-16
}

# build_if_changed TAG DIGEST CONTEXT [docker build arguments...]: build CONTEXT as TAG unless
# the image exists with the label org.raddeploy.inputs=DIGEST.
build_if_changed() {
  local tag=$1 digest=$2 context=$3
  shift 3
  local have
  have=$(docker image inspect -f '{{ index .Config.Labels "org.raddeploy.inputs" }}' "$tag" 2>/dev/null || true)
  if [ "$have" != "$digest" ]; then
    echo "images: building $tag"
    # (the legacy builder: BuildKit is not in Debian's docker.io; its deprecation notice is dropped)
    DOCKER_BUILDKIT=0 docker build -q --label "org.raddeploy.inputs=$digest" -t "$tag" "$@" "$context" \
      2> >(grep -v -E "DEPRECATED|BuildKit is currently disabled|environment-variable|^$" >&2) >/dev/null
  fi
}

# download_wheels REQUIREMENTS DEST [PYTHON_VERSION]: the wheels REQUIREMENTS pins, exactly those
# (--no-deps: the image's base provides their other dependencies), built for the images' Python
# (default 3.11, Debian bookworm's) on manylinux x86_64, downloaded with this host's pip from the
# package index into DEST. Only when REQUIREMENTS changed (DEST/.requirements holds its hash), so
# a second run needs no network. Returns 1, saying why, when there is no pip or no index.
download_wheels() {
  local requirements=$1 dest=$2 python_version=${3:-3.11}
  local want
  want=$(printf '%s\n' "$python_version" | cat - "$requirements" | sha256sum | cut -c1-16)
  [ "$(cat "$dest/.requirements" 2>/dev/null || true)" = "$want" ] && return 0
  local py=${PYTHON:-.venv/bin/python}
  [ -x "$py" ] && "$py" -m pip --version >/dev/null 2>&1 || py=python3
  "$py" -m pip --version >/dev/null 2>&1 || { echo "images: no pip on this host to download $requirements" >&2; return 1; }
  echo "images: downloading the wheels of $requirements into $dest"
  rm -rf "$dest.new" && mkdir -p "$dest.new"
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp --abi "cp${python_version/./}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -r "$requirements" -d "$dest.new" 2> >(grep -v -E "Location '" >&2) || {
      echo "images: pip download of $requirements failed (is the package index reachable?)" >&2
      rm -rf "$dest.new"; return 1; }
  echo "$want" >"$dest.new/.requirements"
  rm -rf "$dest" && mv "$dest.new" "$dest"
}

# raddeploy/busybox: Debian's static busybox and its applets, nothing else (1 MB), unless it is here.
# The GPUs' network-namespace holders run it (`sleep`; RADDEPLOY_MODEL_NETNS_IMAGE) on every host with
# model containers; the tests' plumbing models too.
busybox_image() {
  docker image inspect raddeploy/busybox:latest >/dev/null 2>&1 && return 0
  local root
  root=$(mktemp -d)
  mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  tar -C "$root" -c . | docker import - raddeploy/busybox:latest >/dev/null
  rm -rf "$root"
}
