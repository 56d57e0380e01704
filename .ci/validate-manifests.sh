#!/usr/bin/env bash
# Validates slipway's Kubernetes manifests.
#
#   .ci/validate-manifests.sh [extra.yaml...]
#
# 1. Renders every kustomization under daemonset/ with `kubectl kustomize`.
# 2. Checks every rendered object, and every object in the extra YAML files
#    given as arguments, against the Kubernetes OpenAPI schemas with
#    `kubernetes-validate --strict`, for each version in SLIPWAY_KUBE_VERSIONS.
#    CRD kinds listed in CRD_KINDS below are skipped, with the reason printed;
#    any other kind without a schema is an error.
# 3. Runs checkov on every render, skipping the checks listed, each with a
#    reason, in daemonset/checkov-skips.txt. A finding not listed there fails,
#    and so does a listed skip that no render needs any more.
#
# Exits non-zero on any failure. Tools are installed, at pinned versions, into
# a virtualenv at ${SLIPWAY_VENV:-/opt/slipway-venv}; kubectl comes from the
# machine (KUBECTL=... to use another).
set -euo pipefail

KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
# Oldest and newest Kubernetes minor versions the manifests are checked
# against (kubernetes-validate 1.37.0 ships schemas for 1.25 to 1.37).
read -r -a KUBE_VERSIONS <<<"${SLIPWAY_KUBE_VERSIONS:-1.31.0 1.34.0}"
VENV=${SLIPWAY_VENV:-/opt/slipway-venv}
KUBECTL=${KUBECTL:-kubectl}

# Custom resources: kubernetes-validate has schemas for built-in kinds only.
# One "apiVersion kind" per line.
CRD_KINDS='monitoring.coreos.com/v1 PodMonitor
monitoring.coreos.com/v1 ServiceMonitor'

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
skips_file=daemonset/checkov-skips.txt

say() { printf 'validate-manifests: %s\n' "$*"; }
die() { printf 'validate-manifests: error: %s\n' "$*" >&2; exit 1; }

failures=0
fail() { printf 'validate-manifests: FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }

extras=()
for f in "$@"; do
  [[ -f $f ]] || die "no such file: $f"
  extras+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")")
done

cd "$repo"
command -v "$KUBECTL" >/dev/null || die "kubectl not found (set KUBECTL=/path/to/kubectl)"
command -v python3 >/dev/null || die "python3 not found"

# --- tools ------------------------------------------------------------------
installed_version() {
  "$VENV/bin/python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'
}
if [[ ! -x $VENV/bin/python ]]; then
  say "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
if [[ $(installed_version kubernetes-validate) != "$KUBERNETES_VALIDATE_VERSION" ||
      $(installed_version checkov) != "$CHECKOV_VERSION" ]]; then
  say "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION checkov==$CHECKOV_VERSION into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "checkov==$CHECKOV_VERSION"
fi
say "kubectl: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
say "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version), checkov $("$VENV/bin/checkov" --version)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Splits a multi-document YAML file into one file per object under OUTDIR,
# leaving out the CRD kinds (printed with the reason). Fails on a document
# that is not a Kubernetes object.
cat >"$work/split.py" <<'PY'
import os, re, sys, yaml

src, outdir, label = sys.argv[1], sys.argv[2], sys.argv[3]
crds = {tuple(l.split()) for l in os.environ["CRD_KINDS"].splitlines() if l.strip()}
os.makedirs(outdir, exist_ok=True)
bad = 0
with open(src) as f:
    docs = list(yaml.safe_load_all(f))
for i, doc in enumerate(docs):
    if doc is None:
        continue
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        print(f"{label}: document {i + 1} is not a Kubernetes object (apiVersion/kind missing)")
        bad += 1
        continue
    api, kind = doc["apiVersion"], doc["kind"]
    name = (doc.get("metadata") or {}).get("name", f"doc{i + 1}")
    if (api, kind) in crds:
        print(f"{label}: skip schema check of {kind}/{name} ({api}): custom resource, "
              "kubernetes-validate has schemas for built-in kinds only")
        continue
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{i + 1:03d}-{kind}-{name}")
    with open(os.path.join(outdir, safe + ".yaml"), "w") as out:
        yaml.safe_dump(doc, out, sort_keys=False)
sys.exit(1 if bad else 0)
PY

schema_check() { # LABEL FILE
  local label=$1 file=$2 dir out
  dir=$work/split/$(printf '%s' "$label" | tr -c 'A-Za-z0-9_.-' '_')
  if ! CRD_KINDS=$CRD_KINDS "$VENV/bin/python" "$work/split.py" "$file" "$dir" "$label"; then
    fail "$label: not valid Kubernetes YAML"
    return
  fi
  shopt -s nullglob
  local objects=("$dir"/*.yaml)
  shopt -u nullglob
  if ((${#objects[@]} == 0)); then
    fail "$label: no objects to validate"
    return
  fi
  local v
  for v in "${KUBE_VERSIONS[@]}"; do
    # --quiet prints only warnings and errors; a warning (e.g. no schema for
    # a kind) counts as a failure too.
    if out=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "${objects[@]}" 2>&1) && [[ -z $out ]]; then
      say "$label: ${#objects[@]} objects valid for Kubernetes $v (strict)"
    else
      printf '%s\n' "$out" | sed "s#$dir/##g" >&2
      fail "$label: kubernetes-validate --strict -k $v"
    fi
  done
}

# --- checkov skip list (read first, to fail early on a bad line) ----------------------------------------------------------------
[[ -f $skips_file ]] || die "$skips_file is missing"
skip_ids=()
skip_scopes=()
skip_lines=()
n=0
while IFS= read -r line || [[ -n $line ]]; do
  n=$((n + 1))
  [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
  if [[ ! $line =~ ^[[:space:]]*(CKV2?_K8S_[0-9]+)([^#]*)#[[:space:]]*([^[:space:]].*)$ ]]; then
    die "$skips_file:$n: expected 'CKV_K8S_NN [RENDER...]  # reason', got: $line"
  fi
  id=${BASH_REMATCH[1]}
  read -r -a scope <<<"${BASH_REMATCH[2]}"
  for s in "${scope[@]}"; do
    [[ -f $s/kustomization.yaml ]] || die "$skips_file:$n: $s is not a kustomization directory"
  done
  skip_ids+=("$id")
  skip_scopes+=("${scope[*]}")
  skip_lines+=("$n")
done <"$skips_file"
declare -A skip_used=()

# --- render -----------------------------------------------------------------
mkdir -p "$work/render"
mapfile -t kdirs < <(find daemonset -name kustomization.yaml -printf '%h\n' | sort)
((${#kdirs[@]} > 0)) || die "no kustomization.yaml under daemonset/"
renders=()
for d in "${kdirs[@]}"; do
  out=$work/render/$(printf '%s' "$d" | tr '/' '_').yaml
  if "$KUBECTL" kustomize "$d" >"$out" 2>"$work/kustomize.err"; then
    say "rendered $d ($(grep -c '^kind:' "$out") objects)"
    renders+=("$d")
  else
    cat "$work/kustomize.err" >&2
    fail "kubectl kustomize $d"
  fi
done
render_file() { printf '%s/render/%s.yaml' "$work" "$(printf '%s' "$1" | tr '/' '_')"; }

# --- schemas ----------------------------------------------------------------
for d in "${renders[@]}"; do
  schema_check "$d" "$(render_file "$d")"
done
for f in "${extras[@]}"; do
  schema_check "${f#"$repo"/}" "$f"
done

# --- checkov ---

skips_for() { # RENDER -> comma-separated check IDs that apply to it
  local r=$1 i out=()
  for i in "${!skip_ids[@]}"; do
    if [[ -z ${skip_scopes[i]} || " ${skip_scopes[i]} " == *" $r "* ]]; then
      out+=("${skip_ids[i]}")
    fi
  done
  local IFS=,
  printf '%s' "${out[*]}"
}

export BC_SKIP_MAPPING=TRUE
for d in "${renders[@]}"; do
  file=$(render_file "$d")
  skips=$(skips_for "$d")
  # Run from the render directory so that findings name the render file.
  args=(-f "$(basename "$file")" --framework kubernetes --skip-download --quiet)
  # The gate: with the listed checks skipped, nothing may fail.
  if (cd "$(dirname "$file")" && "$VENV/bin/checkov" "${args[@]}" --compact ${skips:+--skip-check "$skips"}) \
      >"$work/checkov.out" 2>&1; then
    say "$d: checkov passed (skipped: ${skips:-none})"
  else
    cat "$work/checkov.out" >&2
    fail "$d: checkov"
  fi
  # Without skips, to see which listed skips this render still needs.
  (cd "$(dirname "$file")" && "$VENV/bin/checkov" "${args[@]}" -o json) >"$work/checkov.json" 2>/dev/null || true
  if ! failed=$("$VENV/bin/python" - "$work/checkov.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
reports = data if isinstance(data, list) else [data]
ids = set()
for rep in reports:
    res = rep.get("results") or {}
    if res.get("parsing_errors"):
        sys.exit("parsing errors: %s" % res["parsing_errors"])
    ids.update(c["check_id"] for c in res.get("failed_checks", []))
print(" ".join(sorted(ids)))
PY
  ); then
    fail "$d: could not read checkov's JSON report"
    continue
  fi
  for i in "${!skip_ids[@]}"; do
    if [[ " $failed " == *" ${skip_ids[i]} "* ]] &&
       [[ -z ${skip_scopes[i]} || " ${skip_scopes[i]} " == *" $d "* ]]; then
      skip_used[$i]=1
    fi
  done
done
for i in "${!skip_ids[@]}"; do
  if [[ -z ${skip_used[$i]:-} ]]; then
    fail "$skips_file:${skip_lines[i]}: ${skip_ids[i]} is skipped but no render fails it any more; remove the line"
  fi
done

if ((failures > 0)); then
  say "FAILED: $failures problem(s)"
  exit 1
fi
say "OK: ${#renders[@]} kustomizations and ${#extras[@]} extra file(s) valid for Kubernetes ${KUBE_VERSIONS[*]}; checkov clean with ${#skip_ids[@]} listed skips"
