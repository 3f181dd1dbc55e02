# Shared by .ci/deps.sh and .ci/postfix.sh (sourced): Debian packages installed without their
# services being started.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# apt_install_no_start PACKAGE...: installs the packages; a policy-rc.d that answers 101 (unless
# one exists) keeps their services from starting during the install, and goes afterwards.
apt_install_no_start() {
  local policy=/usr/sbin/policy-rc.d created_policy=0
  as_root apt-get -o DPkg::Lock::Timeout=300 update -qq
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    created_policy=1
  fi
  local status=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends "$@" >/dev/null || status=$?
  # Removed whatever the install did: left behind, it would keep every later install on this
  # machine from starting its services.
  if [ "$created_policy" = 1 ]; then as_root rm -f "$policy"; fi
  return "$status"
}
