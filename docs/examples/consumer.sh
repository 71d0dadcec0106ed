#!/bin/sh
# A consumer that follows jetfleet's file contract with no jetfleet code (docs/integration.md).
#
#   consumer.sh MODEL_DIR ACK_FILE [LOAD_COMMAND...]
#
# MODEL_DIR is data_dir/models/<model> (or where a container mounts it, read-only); ACK_FILE
# is data_dir/ack/<model>.json (mounted read-write). Each time `current` moves, it runs
# LOAD_COMMAND ENGINE VERSION (default: check the engine is a non-empty file), then writes
# {"model", "version", "healthy", "reason"} to ACK_FILE through a rename, so the agent
# never reads half a file. Replace LOAD_COMMAND with what loads your engine.
set -u
model_dir=$1
ack=$2
shift 2
[ $# -gt 0 ] || set -- test -s
model=$(basename "$model_dir")
seen=""
while :; do
    target=$(readlink "$model_dir/current" 2>/dev/null || true)
    if [ -n "$target" ] && [ "$target" != "$seen" ]; then
        # Resolve `current` once: engine and version come from the same immutable dir.
        dir="$model_dir/$target"
        version=$(cat "$dir/version" 2>/dev/null || basename "$target")
        if "$@" "$dir/engine" "$version"; then
            healthy=true reason="loaded"
        else
            healthy=false reason="load failed (exit $?)"
        fi
        printf '{"model": "%s", "version": "%s", "healthy": %s, "reason": "%s", "pid": %d}\n' \
            "$model" "$version" "$healthy" "$reason" $$ > "$ack.tmp.$$"
        mv -f "$ack.tmp.$$" "$ack"
        seen=$target
    fi
    sleep 0.2
done
