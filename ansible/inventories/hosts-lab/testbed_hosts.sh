#!/bin/sh
# Ansible inventory script: the hypervisor hosts of the testbed's hosts lab, as
# `testbed hosts inventory --json` prints them (groups testbed_hosts and
# testbed_hosts_trusted; per host its address; root over OpenSSH with the lab key and the
# lab's ssh_config: the lab's known_hosts only, strict host key checking). Read-only.
# No lab yet: empty groups. Environment: TESTBED_HOME (work directory), TESTBED_CLI.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
project=$(dirname "$(dirname "$(dirname "$here")")")
case "${1:-}" in
    --host) echo '{}'; exit 0 ;;  # every host's variables are in --list's _meta
    --list) ;;
    *) echo "usage: $0 --list | --host HOST" >&2; exit 2 ;;
esac
cli=${TESTBED_CLI:-$project/.venv/bin/testbed}
[ -x "$cli" ] || cli=testbed
exec "$cli" --workdir "${TESTBED_HOME:-$project/.testbed/hosts-lab}" hosts inventory --json
