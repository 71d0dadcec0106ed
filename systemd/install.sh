#!/usr/bin/env bash
# Install (or uninstall) jetfleet-agent on a Jetson as a systemd service.
#
#   sudo systemd/install.sh --device-id robot-0042 --trust trust.json \
#        --broker mqtts://broker.lan:8883 [--groups warehouse-a,canary] \
#        [--ca ca.pem --cert robot.pem --key robot.key] [--from jetfleet.whl|SRC_DIR]
#        [--activation-unit robot-ai] [--backend auto|tensorrt|onnxruntime]
#   sudo systemd/install.sh --uninstall [--purge]
#
# Creates the system user `jetfleet` (also in the video and render groups, which own the
# GPU device nodes), /opt/jetfleet/venv (--system-site-packages, so that JetPack's
# python3-libnvinfer `tensorrt` module is importable), /etc/jetfleet/agent.toml
# (0640 root:jetfleet) and trust.json, /var/lib/jetfleet (0750 jetfleet), the units, and
# enables the service. A rerun with the same arguments changes nothing and says so;
# a config file that differs from what this run writes is kept as agent.toml.bak-TIME.
# Uninstall keeps /var/lib/jetfleet (engines, job history) unless --purge.
#
# For image builds and tests: --prefix DIR installs under DIR (like DESTDIR: the files
# name the final paths), --no-useradd uses an existing --user/--group, --no-systemctl
# leaves systemd alone, --pip-args passes extra arguments to pip (e.g. "--no-index
# --find-links /media/usb/wheels" on a robot without internet).
set -euo pipefail

prog=install.sh
say() { echo "$prog: $*"; }
die() { echo "$prog: error: $*" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
device_id="" trust="" broker="" groups="" ca="" cert="" key="" from="" backend="auto"
prefix="" use_systemctl=1 use_useradd=1 uninstall=0 purge=0 pip_args="" activation_unit=""
user=jetfleet group=jetfleet python=""
while [ $# -gt 0 ]; do
  case $1 in
    --device-id) device_id=${2:?}; shift 2 ;;
    --trust) trust=${2:?}; shift 2 ;;
    --broker) broker=${2:?}; shift 2 ;;
    --groups) groups=${2?}; shift 2 ;;
    --ca) ca=${2:?}; shift 2 ;;
    --cert) cert=${2:?}; shift 2 ;;
    --key) key=${2:?}; shift 2 ;;
    --from) from=${2:?}; shift 2 ;;
    --backend) backend=${2:?}; shift 2 ;;
    --activation-unit) activation_unit=${2:?}; shift 2 ;;
    --python) python=${2:?}; shift 2 ;;
    --prefix) prefix=${2:?}; shift 2 ;;
    --user) user=${2:?}; shift 2 ;;
    --group) group=${2:?}; shift 2 ;;
    --pip-args) pip_args=${2?}; shift 2 ;;
    --no-systemctl) use_systemctl=0; shift ;;
    --no-useradd) use_useradd=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
prefix=${prefix%/}
if [ -z "$prefix" ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo), or give --prefix DIR to install into a staging directory"
fi

OPT=/opt/jetfleet VENV=/opt/jetfleet/venv ETC=/etc/jetfleet DATA=/var/lib/jetfleet
UNITDIR=/etc/systemd/system BINDIR=/usr/local/bin
UNITS=(jetfleet-agent.service jetfleet-activate@.path jetfleet-activate@.service)
changed=0
# Owned by root where we can; a non-root run into a --prefix (a test) owns its files itself.
if [ "$(id -u)" -eq 0 ]; then root_owner=root; else root_owner=$(id -un); fi

note() { changed=$((changed + 1)); say "$*"; }

ensure_dir() {  # ensure_dir PATH MODE OWNER GROUP
  local p=$prefix$1
  if [ ! -d "$p" ]; then
    install -d -m "$2" -o "$3" -g "$4" "$p"; note "created $1 ($2 $3:$4)"
  elif [ "$(stat -c '%a %U %G' "$p")" != "${2#0} $3 $4" ]; then
    chmod "$2" "$p"; chown "$3:$4" "$p"; note "fixed mode/owner of $1 ($2 $3:$4)"
  fi
}

ensure_file() {  # ensure_file SRC DEST MODE OWNER GROUP [backup]
  local p=$prefix$2
  if [ -f "$p" ] && cmp -s "$1" "$p"; then
    if [ "$(stat -c '%a %U %G' "$p")" != "${3#0} $4 $5" ]; then
      chmod "$3" "$p"; chown "$4:$5" "$p"; note "fixed mode/owner of $2 ($3 $4:$5)"
    fi
    return 0
  fi
  if [ -f "$p" ] && [ "${6:-}" = backup ]; then
    local bak
    bak="$p.bak-$(date -u +%Y%m%dT%H%M%SZ)"
    cp -p "$p" "$bak"; say "kept the previous $2 as ${bak#"$prefix"}"
  fi
  local tmp
  tmp=$(mktemp "$(dirname "$p")/.install.XXXXXX")
  cp "$1" "$tmp"; chmod "$3" "$tmp"; chown "$4:$5" "$tmp"; sync "$tmp"
  mv -f "$tmp" "$p"
  note "wrote $2 ($3 $4:$5)"
}

ensure_link() {  # ensure_link TARGET LINK
  local p=$prefix$2
  if [ -L "$p" ] && [ "$(readlink "$p")" = "$1" ]; then return 0; fi
  ln -sfn "$1" "$p"; note "linked $2 -> $1"
}

remove() {  # remove PATH...
  local x
  for x in "$@"; do
    if [ -e "$prefix$x" ] || [ -L "$prefix$x" ]; then rm -rf -- "$prefix$x"; note "removed $x"; fi
  done
}

run_systemctl() { if [ $use_systemctl -eq 1 ]; then systemctl "$@"; fi; }

toml_str() {  # a TOML basic string
  local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"
}

# ---------------------------------------------------------------- uninstall
if [ $uninstall -eq 1 ]; then
  if [ $use_systemctl -eq 1 ] && systemctl cat jetfleet-agent.service >/dev/null 2>&1; then
    systemctl disable --now jetfleet-agent.service >/dev/null 2>&1 || true
    for u in $(systemctl list-units --all --plain --no-legend 'jetfleet-activate@*' 2>/dev/null | awk '{print $1}'); do
      systemctl disable --now "$u" >/dev/null 2>&1 || true
    done
    note "stopped and disabled jetfleet-agent.service"
  fi
  remove "$UNITDIR/jetfleet-agent.service" "$UNITDIR/jetfleet-activate@.path" \
    "$UNITDIR/jetfleet-activate@.service" "$BINDIR/jetfleet-agent" "$OPT" "$ETC"
  run_systemctl daemon-reload
  if [ $purge -eq 1 ]; then
    remove "$DATA"
    if [ $use_useradd -eq 1 ] && getent passwd "$user" >/dev/null; then
      userdel "$user"; note "deleted user $user"
    fi
  elif [ -d "$prefix$DATA" ]; then
    say "kept $DATA (engines, job history); --purge removes it"
  fi
  [ $changed -gt 0 ] || say "nothing to remove"
  exit 0
fi

# ---------------------------------------------------------------- checks
id_re='^[a-z0-9][a-z0-9._-]{0,63}$'
[ -n "$device_id" ] || die "--device-id is required"
[[ $device_id =~ $id_re ]] || die "device id '$device_id' must match $id_re"
IFS=, read -r -a group_list <<< "$groups"
for g in "${group_list[@]}"; do
  [[ $g =~ $id_re ]] || die "group '$g' must match $id_re"
done
[ -n "$broker" ] || die "--broker is required (mqtt://HOST:1883 or mqtts://HOST:8883)"
[[ $broker =~ ^(mqtt|mqtts|tcp|ssl)://[^/:]+(:[0-9]+)?/?$ ]] || die "broker url '$broker' must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
case $backend in auto|tensorrt|onnxruntime) ;; *) die "--backend must be auto, tensorrt or onnxruntime" ;; esac
[ -n "$trust" ] || die "--trust trust.json is required (made by 'jetfleet keys init DIR': DIR/trust.json)"
[ -f "$trust" ] || die "trust root file $trust does not exist"
if [ -n "$cert$key" ] && { [ -z "$cert" ] || [ -z "$key" ]; }; then
  die "mutual TLS needs both --cert and --key"
fi
for f in "$ca" "$cert" "$key"; do
  [ -z "$f" ] || [ -f "$f" ] || die "TLS file $f does not exist"
done
if [ -n "$activation_unit" ]; then
  [[ $activation_unit =~ ^[A-Za-z0-9_.:-]+$ ]] || die "--activation-unit '$activation_unit' is not a unit name (without .service)"
  activation_unit=${activation_unit%.service}
fi
if [ -z "$python" ]; then
  if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; else python=$(command -v python3 || true); fi
fi
[ -n "$python" ] && [ -x "$python" ] || die "python3 not found (apt-get install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$python is $("$python" --version 2>&1); jetfleet-agent needs Python 3.10+ (JetPack 6)"
"$python" -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["payloadType"] == "application/vnd.jetfleet.trust+json" and d["signatures"]' "$trust" 2>/dev/null \
  || die "$trust is not a signed jetfleet trust root (DSSE envelope from 'jetfleet keys init')"
if [ -z "$from" ] && [ -f "$here/../pyproject.toml" ]; then from=$(cd "$here/.." && pwd); fi

# ---------------------------------------------------------------- user
if [ $use_useradd -eq 1 ]; then
  if ! getent group "$group" >/dev/null; then groupadd --system "$group"; note "created group $group"; fi
  if ! getent passwd "$user" >/dev/null; then
    useradd --system --gid "$group" --home-dir "$DATA" --no-create-home \
      --shell /usr/sbin/nologin --comment "jetfleet agent" "$user"
    note "created system user $user"
  fi
  for g in video render; do
    if getent group "$g" >/dev/null && ! id -nG "$user" | tr ' ' '\n' | grep -qx "$g"; then
      usermod -a -G "$g" "$user"; note "added $user to group $g (GPU device nodes)"
    fi
  done
else
  getent passwd "$user" >/dev/null || die "user $user does not exist (--no-useradd)"
  getent group "$group" >/dev/null || die "group $group does not exist (--no-useradd)"
fi

# ---------------------------------------------------------------- directories
for d in /opt /etc /var /var/lib /usr /usr/local "$BINDIR" /etc/systemd "$UNITDIR"; do
  [ -d "$prefix$d" ] || install -d -m 0755 "$prefix$d"
done
ensure_dir "$OPT" 0755 "$root_owner" "$root_owner"
ensure_dir "$OPT/bin" 0755 "$root_owner" "$root_owner"
ensure_dir "$ETC" 0750 "$root_owner" "$group"
ensure_dir "$DATA" 0750 "$user" "$group"

# ---------------------------------------------------------------- venv + package
stamp_file=$prefix$VENV/.jetfleet-install
if [ -z "$from" ]; then
  source_id="index:jetfleet"; spec=jetfleet
elif [ -d "$from" ]; then
  [ -f "$from/pyproject.toml" ] || die "$from is not a jetfleet source tree (no pyproject.toml)"
  source_id="src:$(cd "$from" && find protocol agent controller pyproject.toml -name __pycache__ -prune -o -type f -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-32)"
  spec=$from
elif [ -f "$from" ]; then
  source_id="wheel:$(sha256sum "$from" | cut -c1-32)"; spec=$from
else
  die "--from $from: no such wheel or directory"
fi
want_stamp="$source_id $("$python" -c 'import sys; print(sys.version.split()[0])') $pip_args"
if [ ! -x "$prefix$VENV/bin/python" ]; then
  "$python" -m venv --system-site-packages "$prefix$VENV" \
    || die "creating $VENV failed: install python3-venv (apt-get install python3-venv)"
  note "created $VENV (system site packages visible: JetPack's tensorrt)"
fi
if [ ! -f "$stamp_file" ] || [ "$(cat "$stamp_file")" != "$want_stamp" ]; then
  # shellcheck disable=SC2086  # pip_args is a list of words on purpose
  "$prefix$VENV/bin/python" -m pip install -q --disable-pip-version-check $pip_args "$spec" \
    || die "pip install $spec into $VENV failed (see above)"
  printf '%s\n' "$want_stamp" > "$stamp_file"
  note "installed jetfleet into $VENV from ${from:-the package index}"
fi
[ -x "$prefix$VENV/bin/jetfleet-agent" ] || die "$VENV/bin/jetfleet-agent is missing after pip install"
ensure_link "$VENV/bin/jetfleet-agent" "$BINDIR/jetfleet-agent"
ensure_file "$here/jetfleet-restart-unit" "$OPT/bin/jetfleet-restart-unit" 0755 "$root_owner" "$root_owner"

# ---------------------------------------------------------------- config
tmpdir=$(mktemp -d)
trap 'rm -rf "$tmpdir"' EXIT
ensure_file "$trust" "$ETC/trust.json" 0644 "$root_owner" "$group"
tls_ca="" tls_cert="" tls_key=""
if [ -n "$ca$cert" ]; then ensure_dir "$ETC/tls" 0750 "$root_owner" "$group"; fi
if [ -n "$ca" ]; then ensure_file "$ca" "$ETC/tls/ca.pem" 0644 "$root_owner" "$group"; tls_ca=$ETC/tls/ca.pem; fi
if [ -n "$cert" ]; then
  ensure_file "$cert" "$ETC/tls/client.pem" 0644 "$root_owner" "$group"; tls_cert=$ETC/tls/client.pem
  ensure_file "$key" "$ETC/tls/client.key" 0640 "$root_owner" "$group"; tls_key=$ETC/tls/client.key
fi
hook="" groups_toml=""
for g in "${group_list[@]}"; do groups_toml+="${groups_toml:+, }$(toml_str "$g")"; done
if [ -n "$activation_unit" ]; then hook="$OPT/bin/jetfleet-restart-unit $activation_unit"; fi
cat > "$tmpdir/agent.toml" <<EOF
# jetfleet-agent configuration, written by systemd/install.sh (keys: docs/agent.md, Configuration).
# Every key can be overridden by environment: JETFLEET_AGENT_BROKER__URL=...
device_id = $(toml_str "$device_id")
groups = [$groups_toml]
data_dir = "$DATA"
trust_root = "$ETC/trust.json"
backend = "$backend"

[broker]
url = $(toml_str "$broker")
protocol = 5
ca = "$tls_ca"
cert = "$tls_cert"
key = "$tls_key"

[activation]
# Run after each switch of engine; restarting a service goes through jetfleet-activate@.path.
hook = $(toml_str "$hook")
health = ""

[telemetry]
interval_s = 5
EOF
ensure_file "$tmpdir/agent.toml" "$ETC/agent.toml" 0640 "$root_owner" "$group" backup

# ---------------------------------------------------------------- units
for u in "${UNITS[@]}"; do
  ensure_file "$here/$u" "$UNITDIR/$u" 0644 "$root_owner" "$root_owner"
done
if [ $use_systemctl -eq 1 ]; then
  if [ $changed -gt 0 ]; then systemctl daemon-reload; fi
  if ! systemctl is-enabled --quiet jetfleet-agent.service 2>/dev/null; then
    systemctl enable jetfleet-agent.service >/dev/null 2>&1; note "enabled jetfleet-agent.service"
  fi
  if [ -n "$activation_unit" ] && ! systemctl is-enabled --quiet "jetfleet-activate@$activation_unit.path" 2>/dev/null; then
    systemctl enable --now "jetfleet-activate@$activation_unit.path" >/dev/null 2>&1
    note "enabled jetfleet-activate@$activation_unit.path (the hook restarts $activation_unit.service)"
  fi
  if [ $changed -gt 0 ]; then
    # --no-block: READY=1 waits for the broker; an install on an offline robot must not hang.
    systemctl restart --no-block jetfleet-agent.service; say "restarting jetfleet-agent.service"
  fi
fi

if [ $changed -eq 0 ]; then
  say "nothing to change: jetfleet-agent for $device_id is installed as requested"
else
  say "done ($changed change(s)). Check the robot with: sudo -u $user $BINDIR/jetfleet-agent doctor --config $ETC/agent.toml"
fi
