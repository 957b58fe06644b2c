#!/usr/bin/env bash
# Shows the host settings a large roster run depends on, and with --apply sets the ones that
# differ. Safe to run twice. Limits (descriptors, backlogs) are only ever raised; the TCP buffer
# sizes are set to the triple below, whose middle (default) value is deliberately small: an idle
# connection's buffers cost kernel memory, and they still grow to the maximum under load.
#
#   scripts/tune-host.sh           # show
#   scripts/tune-host.sh --apply   # set what differs (needs root / CAP_SYS_ADMIN)
set -u
apply=false
[ "${1:-}" = "--apply" ] && apply=true

# name  wanted  why
limits=(
  "fs.nr_open 2097152 ceiling for any process's open-files limit; one connection is one descriptor"
  "fs.file-max 4194304 descriptors the whole system may have open (server and load generator)"
  "net.core.somaxconn 65535 caps every listen backlog; roster asks for 65535 so a reconnect storm waits instead of failing"
  "net.ipv4.tcp_max_syn_backlog 65535 half-open connections kept during a connect storm"
  "net.core.netdev_max_backlog 65535 packets queued per CPU before the kernel drops them"
)
# name|wanted (min default max)|why
buffers=(
  "net.ipv4.tcp_rmem|4096 16384 4194304|receive buffer per socket: small default keeps idle connections cheap"
  "net.ipv4.tcp_wmem|4096 16384 4194304|send buffer per socket: small default keeps idle connections cheap"
)

status=0
for line in "${limits[@]}"; do
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
  printf '%-32s %-22s want >= %-22s %-20s %s\n' "$name" "$have" "$want" "$mark" "$why"
done

for line in "${buffers[@]}"; do
  IFS='|' read -r name want why <<<"$line"
  have=$(sysctl -n "$name" 2>/dev/null | tr -s '\t ' ' ' || true)
  mark="ok"
  if [ -z "$have" ]; then
    have="?"; mark="unreadable"
  elif [ "$have" != "$want" ]; then
    mark="differs"
    if $apply; then
      if sysctl -qw "$name=$want" 2>/dev/null; then mark="set"; have=$want; else mark="differs (could not set)"; status=1; fi
    fi
  fi
  printf '%-32s %-22s want    %-22s %-20s %s\n' "$name" "$have" "$want" "$mark" "$why"
done

range=$(sysctl -n net.ipv4.ip_local_port_range 2>/dev/null | tr -s '\t ' ' ')
printf '%-32s %-22s %s\n' "net.ipv4.ip_local_port_range" "$range" \
  "ephemeral ports: about 28k connections per (source address, server address) pair; roster-bench --source-addrs 127.0.0.2-127.0.0.60 spreads clients past it"

soft=$(ulimit -Sn); hard=$(ulimit -Hn)
printf '%-32s %-22s %s\n' "open files (this shell)" "$soft/$hard" \
  "soft/hard; roster raises its soft limit to the hard one. Raise the hard one with systemd LimitNOFILE= or limits.conf; a process here holds at most hard-64 connections"
lsoft=$(ulimit -Sl); lhard=$(ulimit -Hl)
printf '%-32s %-22s %s\n' "locked memory KiB (this shell)" "$lsoft/$lhard" \
  "io_uring needs at least 512 KiB; roster raises soft to hard and refuses to start below that"
exit $status
