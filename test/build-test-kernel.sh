#!/usr/bin/env bash
# Builds the xhyve-rs test kernel and its initramfs, from Debian packages only:
#   test/build/test-kernel/vmlinux        uncompressed ELF with a PVH entry (-f kexec,vmlinux)
#   test/build/test-kernel/initramfs.cpio busybox-static + test/initramfs/init-test and
#                                         vsock-echo, uncompressed (test/build-test-initramfs.sh)
#
# The kernel is Debian's linux-source-6.1 configured with `make tinyconfig` plus
# test/kernel/xhyve-test.config, with test/kernel/*.patch applied. Everything a test needs is
# built in (no modules) and nothing the build machines' emulated ring 0 is slow at or cannot
# run is in it (see that fragment and README "Linux here").
#
# The kernel is cached by a hash of its inputs (fragment, patches, the linux-source version and
# this script's compile recipe) in /var/cache/xhyve-rs/ (override: XHYVE_CACHE), so a fresh clone on the same
# machine, or a second run, reuses it in a second. The compile itself runs under
# flock /tmp/xhyve-heavy.lock (one heavy job at a time on shared machines).
#
# Runs as root (apt-get) with no standard input. Prints the path of the vmlinux on stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly KDIR=$ROOT/test/kernel
readonly FRAGMENT=$KDIR/xhyve-test.config
readonly OUT=$ROOT/test/build/test-kernel
readonly CACHE=${XHYVE_CACHE:-/var/cache/xhyve-rs}
readonly LOCK=/tmp/xhyve-heavy.lock
readonly SOURCE_PKG=linux-source-6.1

log() { echo "build-test-kernel: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

export DEBIAN_FRONTEND=noninteractive

# Installs the Debian packages that are missing (by dpkg status, not by command name).
need_pkgs() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return
	((EUID == 0)) || die "please install: ${missing[*]} (or run as root)"
	log "apt-get install ${missing[*]}"
	apt-get -q install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
		{ apt-get -q update >/dev/null && apt-get -q install -y --no-install-recommends "${missing[@]}" >/dev/null; }
}

# The key of the kernel in the cache: what changes the vmlinux, and nothing else: the source
# package's version, the fragment, the patches and this script's recipe (the text of
# compile_kernel, so that editing comments or the caching elsewhere in this file does not cost
# a rebuild).
cache_key() {
	local version
	version=$(dpkg-query -W -f='${Version}' "$SOURCE_PKG")
	{
		echo "$SOURCE_PKG $version"
		declare -f compile_kernel
		sha256sum "$FRAGMENT" "$KDIR"/*.patch | awk '{ print $1 }'
	} | sha256sum | cut -c1-16
}

# Unpacks the source, patches, configures and compiles into $1; leaves vmlinux in $1/src.
compile_kernel() {
	local work=$1 tarball src p want got line name
	tarball=$(find /usr/src -maxdepth 1 -name "$SOURCE_PKG.tar.xz" -print -quit)
	[[ -n $tarball ]] || die "/usr/src/$SOURCE_PKG.tar.xz missing after installing $SOURCE_PKG"
	rm -rf "$work"
	mkdir -p "$work"
	log "unpacking $(basename "$tarball")"
	tar -C "$work" -xJf "$tarball"
	src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -print -quit)
	mv "$src" "$work/src"
	src=$work/src
	for p in "$KDIR"/*.patch; do
		log "patch $(basename "$p")"
		patch -d "$src" -p1 --forward --quiet <"$p" || die "$(basename "$p") does not apply"
	done

	log "make tinyconfig + $(basename "$FRAGMENT")"
	make -C "$src" -s ARCH=x86_64 tinyconfig >/dev/null
	(cd "$src" && scripts/kconfig/merge_config.sh -m -O . .config "$FRAGMENT" >/dev/null)
	make -C "$src" -s ARCH=x86_64 olddefconfig >/dev/null
	# Every option of the fragment must have survived: a dropped one is an unmet dependency.
	while IFS= read -r line; do
		case $line in
		CONFIG_*=*) name=${line%%=*} want=$line ;;
		"# CONFIG_"*" is not set") name=${line#\# } name=${name%% *} want="" ;;
		*) continue ;;
		esac
		got=$(grep -E "^$name=" "$src/.config" || true)
		[[ $got == "$want" ]] || die "$name: fragment wants '${want:-unset}', .config has '${got:-unset}'"
	done <"$FRAGMENT"

	log "make vmlinux (-j$(nproc)) under flock $LOCK"
	local start=$SECONDS
	flock "$LOCK" make -C "$src" -s ARCH=x86_64 -j"$(nproc)" vmlinux >"$work/build.log" 2>&1 ||
		{ tail -40 "$work/build.log" >&2; die "kernel build failed (log: $work/build.log)"; }
	log "compiled in $((SECONDS - start)) s"
	# The initramfs writer (a host tool of the kernel tree): no root needed for device nodes.
	gcc -O2 -o "$src/usr/gen_init_cpio" "$src/usr/gen_init_cpio.c"
}

# Builds the kernel unless the cache has it; fills $OUT/vmlinux and $OUT/gen_init_cpio.
kernel() {
	local key entry work
	key=$(cache_key)
	entry=$CACHE/test-kernel-$key
	if [[ ! -s $entry/vmlinux || ! -x $entry/gen_init_cpio ]]; then
		mkdir -p "$CACHE"
		work=$CACHE/build-$key
		compile_kernel "$work"
		mkdir -p "$entry.tmp"
		cp "$work/src/vmlinux" "$work/src/.config" "$work/src/System.map" "$entry.tmp/"
		cp "$work/src/usr/gen_init_cpio" "$entry.tmp/"
		rm -rf "$entry"
		mv "$entry.tmp" "$entry"
		# Deleting a kernel tree takes minutes on a busy machine: nobody needs to wait for it.
		mv "$work" "$work.old"
		(nice rm -rf "$work.old" &)
	fi
	readelf -n "$entry/vmlinux" | grep -q 'Xen.*0x00000012' ||
		die "$entry/vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
	mkdir -p "$OUT"
	if ! cmp -s "$entry/vmlinux" "$OUT/vmlinux"; then
		cp "$entry/vmlinux" "$OUT/vmlinux.tmp"
		mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
		cp "$entry/.config" "$OUT/config"
	fi
	cp "$entry/gen_init_cpio" "$OUT/gen_init_cpio"
	echo "$key" >"$OUT/key"
}

main() {
	need_pkgs "$SOURCE_PKG" bc bison flex libelf-dev libssl-dev make gcc libc6-dev cpio xz-utils \
		patch binutils busybox-static util-linux
	kernel
	"$ROOT/test/build-test-initramfs.sh" "$OUT/gen_init_cpio" "$OUT/initramfs.cpio"
	log "ready: $OUT/vmlinux ($(stat -c %s "$OUT/vmlinux") bytes), $OUT/initramfs.cpio ($(stat -c %s "$OUT/initramfs.cpio") bytes)"
	echo "$OUT/vmlinux"
}

main "$@"
