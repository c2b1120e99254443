#!/usr/bin/env bash
# Builds the Linux test guest of xhyve-rs from Debian packages, with nothing fetched by hand:
#   test/vmlinuz, test/vmlinux, test/initrd.gz                    linux-image-amd64 (xz bzImage)
#   test/cloud/vmlinuz, test/cloud/vmlinux, test/cloud/initrd.gz  linux-image-cloud-amd64 (lz4)
# vmlinux is the uncompressed ELF inside the bzImage (PVH entry, no self-decompression: the fast
# path where ring-0 guest code is emulated). Each initrd holds busybox-static, test/initramfs/init
# and the virtio/ahci/9p modules of its own kernel.
# Runs as root. A second run only redoes what is older than its inputs (this script included).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly SELF=$ROOT/test/build-linux-guest.sh
readonly BUILD=$ROOT/test/build
readonly DEBS=$BUILD/debs
readonly INIT_SRC=$ROOT/test/initramfs/init

# What the guest needs; dependencies are added from modules.dep, built-ins are skipped.
readonly WANTED_MODULES=(
	virtio virtio_ring virtio_pci virtio_blk virtio_net virtio_rng
	ahci libahci libata sd_mod sr_mod cdrom
	9p 9pnet 9pnet_virtio netfs
)

log() { echo "build-linux-guest: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# True when $1 exists, is non-empty and is newer than every other argument.
is_fresh() {
	local out=$1 input
	shift
	[[ -s $out ]] || return 1
	for input in "$@"; do
		[[ $out -nt $input ]] || return 1
	done
}

APT_UPDATED=0
apt_update_once() {
	if ((APT_UPDATED == 0)); then
		log "apt-get update"
		apt-get -q update >/dev/null
		APT_UPDATED=1
	fi
}

# Installs the Debian package $2 when command $1 is missing.
need_tool() {
	command -v "$1" >/dev/null && return
	log "installing $2 (for $1)"
	apt-get -q install -y --no-install-recommends "$2" >/dev/null 2>&1 ||
		{ apt_update_once && apt-get -q install -y --no-install-recommends "$2" >/dev/null; }
	command -v "$1" >/dev/null || die "$2 did not provide $1"
}

# The real kernel package behind a metapackage, e.g. linux-image-amd64 -> linux-image-6.1.0-56-amd64.
resolve_kernel_package() {
	local meta=$1 real
	real=$(apt-cache depends "$meta" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
	if [[ -z $real ]]; then
		apt_update_once
		real=$(apt-cache depends "$meta" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
	fi
	[[ -n $real ]] || die "cannot resolve metapackage $meta to a linux-image-6.* package"
	echo "$real"
}

# Downloads package $1 (no install) into $DEBS once; prints the path of its .deb.
download_deb() {
	local pkg=$1 deb
	deb=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*_amd64.deb" -print -quit)
	if [[ -z $deb ]]; then
		log "apt-get download $pkg"
		# A stale package list points at a version the mirror no longer has: update and retry.
		(cd "$DEBS" && apt-get -q -o APT::Sandbox::User=root download "$pkg" >/dev/null 2>&1) ||
			{ apt_update_once && (cd "$DEBS" && apt-get -q -o APT::Sandbox::User=root download "$pkg" >/dev/null); }
		deb=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*_amd64.deb" -print -quit)
		[[ -n $deb ]] || die "apt-get download $pkg produced no .deb"
	fi
	echo "$deb"
}

# Unpacks $1 into directory $2 unless already done for this very .deb.
unpack_deb() {
	local deb=$1 dir=$2 stamp=$2/.unpacked
	if is_fresh "$stamp" "$deb" && [[ $(cat "$stamp") == "$(basename "$deb")" ]]; then
		return
	fi
	log "dpkg-deb -x $(basename "$deb")"
	rm -rf "$dir"
	mkdir -p "$dir"
	dpkg-deb -x "$deb" "$dir"
	basename "$deb" >"$stamp"
}

# Little-endian unsigned integer of $3 bytes at offset $2 of file $1.
read_le() {
	od -An -tu"$3" --endian=little -j "$2" -N "$3" "$1" | tr -d ' '
}

# Hex of $3 bytes at offset $2 of file $1, e.g. "fd377a585a00".
read_hex() {
	od -An -tx1 -v -j "$2" -N "$3" "$1" | tr -d ' \n'
}

# Decompressor command for the payload whose first bytes are the hex string $1 (empty: unknown).
# Same magic numbers as the kernel's scripts/extract-vmlinux.
decompressor_for_magic() {
	case $1 in
	1f8b08*) echo "gzip -dc" ;;
	fd377a585a00*) echo "xz -dc --single-stream" ;;
	02214c18*) echo "lz4 -dc" ;;
	28b52ffd*) echo "zstd -dcq" ;;
	425a68*) echo "bzip2 -dc" ;;
	5d000000*) echo "xz -dc --format=lzma" ;;
	894c5a*) echo "lzop -dc" ;;
	*) echo "" ;;
	esac
}

# Decompresses $3 bytes (0: to end of file) from offset $2 of bzImage $1 into $4 and checks that
# the result is an ELF. Decompressors complain about the 4-byte size the kernel appends to the
# payload, so their status is ignored and the ELF check decides.
try_payload() {
	local image=$1 offset=$2 length=$3 out=$4 magic cmd
	magic=$(read_hex "$image" "$offset" 6)
	cmd=$(decompressor_for_magic "$magic")
	[[ -n $cmd ]] || return 1
	if ((length > 0)); then
		tail -c +"$((offset + 1))" "$image" | head -c "$length" | $cmd >"$out" 2>/dev/null || true
	else
		tail -c +"$((offset + 1))" "$image" | $cmd >"$out" 2>/dev/null || true
	fi
	[[ -s $out && $(read_hex "$out" 0 4) == 7f454c46 ]] || return 1
	log "  payload at offset $offset: ${cmd%% *} -> ELF ($(stat -c %s "$out") bytes)"
}

# Writes the uncompressed ELF vmlinux inside bzImage $1 to $2.
# The boot header (protocol >= 2.08) says exactly where the payload is; a magic-number scan of
# the whole image, as scripts/extract-vmlinux does, is the fallback.
extract_vmlinux() {
	local image=$1 out=$2 tmp=$2.tmp setup_sects version start length expected magic off cmd
	need_tool od coreutils
	if [[ $(read_hex "$image" 0x202 4) == 48647253 ]]; then # "HdrS"
		setup_sects=$(read_le "$image" 0x1f1 1)
		((setup_sects == 0)) && setup_sects=4
		version=$(read_le "$image" 0x206 2)
		if ((version >= 0x208)); then
			start=$(((setup_sects + 1) * 512 + $(read_le "$image" 0x248 4)))
			length=$(read_le "$image" 0x24c 4)
			if try_payload "$image" "$start" "$length" "$tmp"; then
				# The kernel appends the uncompressed size to every payload: a truncated
				# decompression is an error, not a shorter kernel.
				expected=$(read_le "$image" "$((start + length - 4))" 4)
				[[ $(stat -c %s "$tmp") == "$expected" ]] ||
					die "$image: decompressed $(stat -c %s "$tmp") bytes, header says $expected"
				mv "$tmp" "$out"
				return
			fi
		fi
	fi
	log "  $image: boot header did not lead to the payload; scanning for compression magic"
	for magic in '\x1f\x8b\x08' '\xfd\x37\x7a\x58\x5a\x00' '\x02\x21\x4c\x18' '\x28\xb5\x2f\xfd' \
		'\x42\x5a\x68' '\x5d\x00\x00\x00' '\x89\x4c\x5a'; do
		while read -r off; do
			if try_payload "$image" "$off" 0 "$tmp"; then
				mv "$tmp" "$out"
				return
			fi
		done < <(LC_ALL=C grep -obUaP "$magic" "$image" | cut -d: -f1)
	done
	rm -f "$tmp"
	die "$image: no compressed ELF payload found"
}

# Module name as modprobe sees it: basename without .ko[.xz|.zst|.gz], dashes as underscores.
module_name() {
	local base=${1##*/}
	base=${base%%.ko*}
	echo "${base//-/_}"
}

# Prints the wanted modules of kernel tree $1 (lib/modules/<ver>) and their dependencies as
# "name path" lines, dependencies first. Built-in modules are skipped; unknown ones are reported.
resolve_modules() {
	local moddir=$1 line target deps name
	declare -A path_of=() deps_of=() builtin=() state=()
	while IFS= read -r line; do
		target=${line%%:*}
		deps=${line#*:}
		name=$(module_name "$target")
		path_of[$name]=$target
		deps_of[$name]=$deps
	done <"$moddir/modules.dep"
	if [[ -r $moddir/modules.builtin ]]; then
		while IFS= read -r line; do
			builtin[$(module_name "$line")]=1
		done <"$moddir/modules.builtin"
	fi

	visit() {
		local n=$1 d
		[[ -n ${state[$n]:-} ]] && return
		state[$n]=open
		for d in ${deps_of[$n]:-}; do
			visit "$(module_name "$d")"
		done
		state[$n]=closed
		echo "$n ${path_of[$n]}"
	}
	for name in "${WANTED_MODULES[@]}"; do
		if [[ -n ${path_of[$name]:-} ]]; then
			visit "$name"
		elif [[ -n ${builtin[$name]:-} ]]; then
			log "  $name: built into the kernel"
		else
			log "  $name: not in this kernel (neither module nor built-in), skipped"
		fi
	done
}

# Builds gzip'd newc initramfs $3 for kernel tree root $1 (an unpacked linux-image package)
# with busybox from unpacked package root $2.
build_initrd() {
	local kroot=$1 bbroot=$2 out=$3
	local stage moddir kver name path applet
	stage=$BUILD/initramfs-$(basename "$(dirname "$out")")
	moddir=$(find "$kroot/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)
	[[ -n $moddir ]] || die "$kroot: no lib/modules/<version>"
	kver=$(basename "$moddir")
	# Debian generates modules.dep in the package's postinst, which dpkg-deb -x does not run.
	if [[ ! -s $moddir/modules.dep ]]; then
		need_tool depmod kmod
		depmod -b "$kroot" "$kver"
	fi
	log "initramfs for $kver"

	rm -rf "$stage"
	mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lib/modules/"$kver"}
	install -m 0755 "$bbroot/bin/busybox" "$stage/bin/busybox"
	while read -r applet; do
		[[ -e $stage/$applet ]] || ln -s /bin/busybox "$stage/$applet"
	done < <("$stage/bin/busybox" --list-full)
	install -m 0755 "$INIT_SRC" "$stage/init"
	# The kernel opens /dev/console before /init runs and devtmpfs is mounted.
	mknod -m 0600 "$stage/dev/console" c 5 1

	: >"$stage/lib/modules/$kver/load-order"
	while read -r name path; do
		case $path in
		*.ko.xz) xz -dc "$moddir/$path" >"$stage/lib/modules/$kver/$name.ko" ;;
		*.ko.zst) zstd -dcq "$moddir/$path" >"$stage/lib/modules/$kver/$name.ko" ;;
		*.ko.gz) gzip -dc "$moddir/$path" >"$stage/lib/modules/$kver/$name.ko" ;;
		*.ko) cp "$moddir/$path" "$stage/lib/modules/$kver/$name.ko" ;;
		*) die "$path: unknown module format" ;;
		esac
		echo "$name" >>"$stage/lib/modules/$kver/load-order"
	done < <(resolve_modules "$moddir")
	log "  modules: $(tr '\n' ' ' <"$stage/lib/modules/$kver/load-order")"

	(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
		gzip -9n >"$out.tmp"
	mv "$out.tmp" "$out"
}

# Produces vmlinuz, vmlinux and initrd.gz of one flavour in directory $2 from metapackage $1.
build_flavour() {
	local meta=$1 outdir=$2 pkg deb kroot vmlinuz
	pkg=$(resolve_kernel_package "$meta")
	deb=$(download_deb "$pkg")
	kroot=$BUILD/$pkg
	unpack_deb "$deb" "$kroot"
	mkdir -p "$outdir"

	if ! is_fresh "$outdir/vmlinuz" "$deb" "$SELF"; then
		vmlinuz=$(find "$kroot/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
		[[ -n $vmlinuz ]] || die "$pkg has no /boot/vmlinuz-*"
		cp "$vmlinuz" "$outdir/vmlinuz.tmp"
		mv "$outdir/vmlinuz.tmp" "$outdir/vmlinuz"
	fi
	if ! is_fresh "$outdir/vmlinux" "$outdir/vmlinuz" "$SELF"; then
		log "extracting vmlinux from $outdir/vmlinuz"
		extract_vmlinux "$outdir/vmlinuz" "$outdir/vmlinux"
	fi
	if ! is_fresh "$outdir/initrd.gz" "$deb" "$BUSYBOX_DEB" "$INIT_SRC" "$SELF"; then
		build_initrd "$kroot" "$BUSYBOX_ROOT" "$outdir/initrd.gz"
	fi
}

main() {
	((EUID == 0)) || die "run as root (apt-get download, mknod)"
	mkdir -p "$DEBS"
	need_tool dpkg-deb dpkg
	need_tool cpio cpio
	need_tool xz xz-utils
	need_tool lz4 lz4
	need_tool zstd zstd

	BUSYBOX_DEB=$(download_deb busybox-static)
	BUSYBOX_ROOT=$BUILD/busybox-static
	unpack_deb "$BUSYBOX_DEB" "$BUSYBOX_ROOT"

	build_flavour linux-image-amd64 "$ROOT/test"
	build_flavour linux-image-cloud-amd64 "$ROOT/test/cloud"
	# Generated outputs: keep them out of git without touching the top-level .gitignore.
	[[ -e $ROOT/test/cloud/.gitignore ]] || echo '*' >"$ROOT/test/cloud/.gitignore"

	local f
	echo "Linux guest ready:"
	for f in test/vmlinuz test/vmlinux test/initrd.gz test/cloud/vmlinuz test/cloud/vmlinux test/cloud/initrd.gz; do
		printf '  %-22s %10d bytes  %s\n' "$f" "$(stat -c %s "$ROOT/$f")" "$(file -b "$ROOT/$f" 2>/dev/null | cut -c1-60 || true)"
	done
}

main "$@"
