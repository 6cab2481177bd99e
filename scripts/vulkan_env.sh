#!/usr/bin/env bash
# Makes sure a Vulkan device exists for burn's `wgpu` backend: on a machine without a GPU, Mesa's
# software rasteriser lavapipe (Debian's mesa-vulkan-drivers), which runs the same CubeCL kernels
# the cuda backend runs, on the CPU. Installs it with apt-get when no Vulkan driver is present
# (as root, or through sudo). Idempotent; exits non-zero with a message when it cannot.
set -euo pipefail
have_driver() { compgen -G "/usr/share/vulkan/icd.d/*.json" >/dev/null || compgen -G "/etc/vulkan/icd.d/*.json" >/dev/null; }
if have_driver && ldconfig -p | grep -q 'libvulkan.so.1'; then
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
        echo "vulkan_env.sh: no Vulkan driver, and installing one needs root: apt-get install mesa-vulkan-drivers (or SKIP_WGPU=1)" >&2
        exit 1
    fi
fi
echo "installing Mesa's Vulkan drivers (lavapipe) for the wgpu backend check ..." >&2
export DEBIAN_FRONTEND=noninteractive
packages=(mesa-vulkan-drivers libvulkan1)
$sudo apt-get install -y --no-install-recommends "${packages[@]}" >&2 ||
    { $sudo apt-get update >&2 && $sudo apt-get install -y --no-install-recommends "${packages[@]}" >&2; } || {
    echo "vulkan_env.sh: apt-get could not install ${packages[*]} (or set SKIP_WGPU=1)" >&2
    exit 1
}
have_driver || { echo "vulkan_env.sh: ${packages[*]} installed but no Vulkan ICD file found" >&2; exit 1; }
