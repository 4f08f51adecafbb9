"""Mutation check of the SoME router, gate and key-update lines: each mutant is applied to a private copy of src/
and tests/ (the working tree is never edited), then the reference test and the older SoME tests run.

    python scripts/some_mutants.py [MUTANT ...]      (default: all; prints killed / SURVIVED per mutant)

A mutant whose original line is in none of some.py, some_router.py and some_update.py is reported as "line not
found": update its text.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

MAIN = pathlib.Path(__file__).resolve().parent.parent
WORK = pathlib.Path(tempfile.mkdtemp(prefix="somoe-mutants-"))
MUTANTS = {
    "gate-softmax-input-halved": ("torch.softmax(top_TK.float(), dim=-1)", "torch.softmax(0.5 * top_TK.float(), dim=-1)"),
    "router-grad-halved-forward-unchanged": ("torch.softmax(top_TK.float(), dim=-1)",
        "torch.softmax((top_TK.detach() + 0.5 * (top_TK - top_TK.detach())).float(), dim=-1)"),
    "gates-detached": ("torch.softmax(top_TK.float(), dim=-1)", "torch.softmax(top_TK.float().detach(), dim=-1)"),
    "gate-softmax-wrong-dim": ("torch.softmax(top_TK.float(), dim=-1)", "torch.softmax(top_TK.float(), dim=0)"),
    "topk-k-minus-1": ("scores_TE.topk(self.top_k_now, dim=-1)", "scores_TE.topk(max(1, self.top_k_now - 1), dim=-1)"),
    "topk-smallest": ("scores_TE.topk(self.top_k_now, dim=-1)", "scores_TE.topk(self.top_k_now, dim=-1, largest=False)"),
    "dot-temperature-multiplied": ("return scores_TE / self.temperature(), q_TD, q_raw_TD", "return scores_TE * self.temperature(), q_TD, q_raw_TD"),
    "dot-no-sqrt-d": ("keys_ED.t().to(q_TD.dtype) / math.sqrt(self.d_model)", "keys_ED.t().to(q_TD.dtype)"),
    "centre-sign": ("q_TD = q_TD - self.query_center.to(q_TD.dtype)", "q_TD = q_TD + self.query_center.to(q_TD.dtype)"),
    "cosine-backward-no-projection": ("dq = (g_TD - q_hat_TD * (g_TD * q_hat_TD).sum(-1, keepdim=True)) / norm_T1", "dq = g_TD / norm_T1"),
    "cosine-dtau-sign": ("d_tau = -(d_scores_TE * scores_TE).sum() / tau", "d_tau = (d_scores_TE * scores_TE).sum() / tau"),
    "cosine-keys-not-normalised": ("k_scaled_ED = F.normalize(keys_ED, dim=-1).to(q_TD.dtype)", "k_scaled_ED = keys_ED.to(q_TD.dtype)"),
    "cosine-tau-ignored": ("k_scaled_ED = k_scaled_ED / tau  #", "k_scaled_ED = k_scaled_ED  #"),
    "train-eval-temperature-swapped": ("base = self.cfg.router_temperature_train if self.training else self.cfg.router_temperature_eval",
        "base = self.cfg.router_temperature_eval if self.training else self.cfg.router_temperature_train"),
    "layerscale-dropped": ("y_TD = y_TD * self.out_scale.to(y_TD.dtype)", "y_TD = y_TD"),
    "key-ema-ignored": ("return self.key_route if self.cfg.key_ema > 0 else self.key_store", "return self.key_store"),
    "repulsion-sign": ("delta_ED += rules.repulsion_delta(keys_ED, r.beta)", "delta_ED -= rules.repulsion_delta(keys_ED, r.beta)"),
    "keys-not-renormalised": ("new_ED = F.normalize(new_ED, dim=1)", "new_ED = new_ED"),
    "dormancy-ignores-token-fraction": ("slots / c.update_token_fraction, c.theta", "slots, c.theta"),
    "query-mean-first-update-uses-ema": ("torch.where(first, total / tokens,", "torch.where(first & False, total / tokens,"),
}


def run(tests: list[str]) -> str:
    """'killed' if the tests fail on the mutated copy, 'SURVIVED' if they pass."""
    env = {**os.environ, "PYTHONPATH": str(WORK / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, "-m", "pytest", *tests, "-q", "-x", "-p", "no:cacheprovider"],
                       cwd=WORK, env=env, capture_output=True, text=True)
    return "killed" if r.returncode else "SURVIVED"


def main(only: list[str]) -> None:
    shutil.copytree(MAIN / "src", WORK / "src")
    shutil.copytree(MAIN / "tests", WORK / "tests")
    files = [WORK / "src/somoe/models/ffn" / name for name in ("some.py", "some_router.py", "some_update.py")]
    pristine = {f: f.read_text() for f in files if f.is_file()}
    baseline = run(["tests/models/test_some_reference.py"])
    print("unmutated reference test:", "passes" if baseline == "SURVIVED" else "FAILS", flush=True)
    for name, (old, new) in MUTANTS.items():
        if only and name not in only:
            continue
        target = next((f for f, text in pristine.items() if text.count(old) == 1), None)
        if target is None:
            print(f"{name}: line not found", flush=True)
            continue
        for f, text in pristine.items():
            f.write_text(text.replace(old, new) if f == target else text)
        new_test = run(["tests/models/test_some_reference.py"])
        older = run(["tests/models/test_some_layer.py", "tests/models/test_some_rules.py"])
        print(f"{name}: reference test {new_test} | previous SoME tests {older}", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
