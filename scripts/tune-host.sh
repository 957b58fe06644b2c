#!/usr/bin/env bash
# Shows the host limits a large roster run depends on, and with --apply sets the ones that are
# too low. Safe to run twice: it only raises, never lowers.
#
#   scripts/tune-host.sh           # show
#   scripts/tune-host.sh --apply   # raise what is too low (needs root / CAP_SYS_ADMIN)
set -u
apply=false
[ "${1:-}" = "--apply" ] && apply=true

# name  wanted  why
sysctls=(
  "fs.nr_open 2097152 ceiling for any process's open-files limit; one connection is one descriptor"
  "fs.file-max 4194304 descriptors the whole system may have open (server and load generator)"
  "net.core.somaxconn 65535 caps every listen backlog; roster asks for 65535 so a reconnect storm waits instead of failing"
  "net.ipv4.tcp_max_syn_backlog 65535 half-open connections kept during a connect storm"
  "net.core.netdev_max_backlog 65535 packets queued per CPU before the kernel drops them"
)

status=0
for line in "${sysctls[@]}"; do
  read -r name want why <<<"$line"
  have=$(sysctl -n "$name" 2>/dev/null || echo "?")
  mark="ok"
  if [ "$have" = "?" ]; then
    mark="unreadable"
  elif [ "$have" -lt "$want" ]; then
    mark="low"
    if $apply; then
      if sysctl -qw "$name=$want" 2>/dev/null; then mark="raised"; have=$want; else mark="low (could not set)"; status=1; fi
    fi
  fi
  printf '%-32s %-12s want >= %-10s %-20s %s\n' "$name" "$have" "$want" "$mark" "$why"
done

range=$(sysctl -n net.ipv4.ip_local_port_range 2>/dev/null | tr -s '\t ' ' ')
printf '%-32s %-12s %s\n' "net.ipv4.ip_local_port_range" "$range" \
  "ephemeral ports: about 28k connections per (source address, server address) pair; roster-bench --source-addrs 127.0.0.2-127.0.0.60 spreads clients past it"

soft=$(ulimit -Sn); hard=$(ulimit -Hn)
printf '%-32s %-12s %s\n' "open files (this shell)" "$soft/$hard" \
  "soft/hard; roster raises its soft limit to the hard one. Raise the hard one with systemd LimitNOFILE= or limits.conf; a process here holds at most hard-64 connections"
lsoft=$(ulimit -Sl); lhard=$(ulimit -Hl)
printf '%-32s %-12s %s\n' "locked memory KiB (this shell)" "$lsoft/$lhard" \
  "io_uring needs at least 512 KiB; roster raises soft to hard and refuses to start below that"
exit $status
