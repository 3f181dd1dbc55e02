#!/usr/bin/env bash
# Installs Postfix (Debian package `postfix`) for tests/it/tail.rs if it is missing, without
# configuring or starting a system mail server: the test runs its own instance with its own
# config and queue directories (`postfix -c DIR`), on no inet port, and stops it afterwards.
# Idempotent: does nothing when /usr/sbin/postfix exists. Never touches a running system Postfix.
set -euo pipefail
if [ -x /usr/sbin/postfix ] && [ -x /usr/sbin/sendmail ] && [ -x /usr/lib/postfix/sbin/postlogd ]; then
  exit 0
fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
echo "postfix: installing the Debian package (no configuration, not started)"
echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
as_root apt-get -o DPkg::Lock::Timeout=300 update -qq
# policy-rc.d 101 keeps the package's service from starting during the install.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
  as_root chmod +x "$policy"
  created_policy=1
fi
as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends postfix >/dev/null
if [ "$created_policy" = 1 ]; then as_root rm -f "$policy"; fi
/usr/sbin/postconf -d mail_version
