#!/usr/bin/env bash
# Installs Postfix (Debian package `postfix`) for tests/it/tail.rs if it is missing, without
# configuring or starting a system mail server: the test runs its own instance with its own
# config and queue directories (`postfix -c DIR`), on no inet port, and stops it afterwards.
# Idempotent: does nothing when /usr/sbin/postfix exists. Never touches a running system Postfix.
set -euo pipefail
if [ -x /usr/sbin/postfix ] && [ -x /usr/sbin/sendmail ] && [ -x /usr/lib/postfix/sbin/postlogd ]; then
  exit 0
fi
source "$(dirname "$0")/apt.sh"
echo "postfix: installing the Debian package (no configuration, not started)"
echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
apt_install_no_start postfix
/usr/sbin/postconf -d mail_version
