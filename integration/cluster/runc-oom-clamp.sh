#!/bin/sh
# The test nodes' runc (#17): runc itself, with one change. A container
# whose OCI spec asks for a negative process.oomScoreAdj gets 0 instead.
#
# Why: the kubelet gives system-node-critical and system-cluster-critical
# pods an OOM score of -998 and Guaranteed pods -997, and runc's nsexec
# writes that to /proc/self/oom_score_adj. Lowering an OOM score needs
# CAP_SYS_RESOURCE, which these machines' capability bounding set lacks
# (CapBnd 000001fffeffffff: bit 24 clear), so even root cannot, and runc
# fails with "failed to update /proc/self/oom_score_adj: Permission denied"
# ("can't get final child's PID from pipe: EOF"). Clamping at 0 is the
# lowest score the machine allows; nothing else in the spec changes.
#
# containerd passes the spec as --bundle DIR (DIR/config.json) to create
# and run, and as --process FILE to exec (probes, kubectl exec).
set -eu
prev=
for a in "$@"; do
  case "$prev" in
    --bundle | -b) sed -i 's/"oomScoreAdj":-[0-9]*/"oomScoreAdj":0/' "$a/config.json" ;;
    --process | -p) sed -i 's/"oomScoreAdj":-[0-9]*/"oomScoreAdj":0/' "$a" ;;
  esac
  prev=$a
done
exec runc "$@"
