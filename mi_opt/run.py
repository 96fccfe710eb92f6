"""`run(recipe, out_dir)`: profile, plan, evaluate the original, apply, evaluate, export, report.

Each stage writes its output atomically into the run folder and records a content hash of its
inputs in stages.json. A rerun skips a stage only when its recorded hash matches (same model
weights, data and settings); anything changed is recomputed, never silently reused. An
interruption leaves every finished stage usable and no half-written file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mi_opt.artifacts import model_fingerprint, now, read_json, write_json
from mi_opt.errors import MiOptError
from mi_opt.recipe import Recipe

MANIFEST = "stages.json"
MANIFEST_SCHEMA = "mi-opt/run-stages"
# What each stage may leave in the run folder, so outputs of a stage that no longer runs (export
# switched off) are removed even when an older manifest did not list them.
STAGE_OUTPUTS = {"profile": ("profile.json", "heads.png", "layers.png"), "plan": ("plan.json",),
                 "eval_original": ("eval_original.json", "eval_original.lm_eval.json"),
                 "eval_compressed": ("eval_compressed.json", "eval_compressed.lm_eval.json"),
                 "heal": ("heal.json", "healed.safetensors"),
                 "eval_healed": ("eval_healed.json", "eval_healed.lm_eval.json"), "speed_ab": ("speed_ab.json",),
                 "export": ("checkpoint",)}
HEAL_WORK = "heal-work-"  # + the heal stage's key: distillation checkpoints while a heal runs
TASK_WORK = ".tasks-work-"  # stage + this + the stage's key: finished tasks while an evaluation runs


def content_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def inside(path: str | Path, root: str | Path, what: str) -> Path:
    """`path`, refused unless it resolves (symlinks followed) to `root` or below it.

    Recipes are shared files and run folders may hold links: this is the one check that a run
    writes nowhere but under its --out folder.
    """
    path, base = Path(path), Path(root).resolve()
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise MiOptError(f"{what} {path} resolves to {resolved}, outside {base}; "
                         "remove the link or choose another --out")
    return path


def run_folder(out: str | Path, name: str) -> Path:
    """OUT/<name>, proven to stay inside OUT (the recipe name is checked again: recipes are data)."""
    from mi_opt.recipe import check_name

    check_name(name)
    return inside(Path(out) / name, out, "run folder")


@dataclass
class RunFolder:
    """A run's folder and its manifest: stage -> {hash, outputs, finished}."""

    root: Path
    stages: dict = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path) -> "RunFolder":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise MiOptError(f"run folder {root} exists and is not a folder")
        path = root / MANIFEST
        stages = read_json(path, MANIFEST_SCHEMA, 1)["stages"] if path.exists() else {}
        return cls(root, stages)

    def done(self, stage: str, key: str) -> bool:
        entry = self.stages.get(stage)
        return bool(entry) and entry["hash"] == key and all((self.root / o).exists() for o in entry["outputs"])

    def mark(self, stage: str, key: str, outputs: list[str]) -> None:
        self.stages[stage] = {"hash": key, "outputs": outputs, "finished": now()}
        self._write()

    def forget(self, stage: str) -> None:
        """Remove a stage's outputs and its manifest entry: before it is recomputed, or when it no
        longer runs, so the folder never shows an earlier run's result as this run's."""
        entry = self.stages.pop(stage, None)
        for name in {*STAGE_OUTPUTS.get(stage, ()), *(entry["outputs"] if entry else ())}:
            if Path(name).name != name or name in ("", ".", ".."):  # the manifest is data: plain names only
                raise MiOptError(f"{self.root / MANIFEST} lists output {name!r} of stage {stage}, which is not "
                                 "a file in the run folder; delete the manifest to start the run afresh")
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)  # a link is removed, never what it points to
        if entry:
            self._write()

    def keep_only(self, stages: list[str]) -> None:
        """Forget every stage this run did not run or reuse."""
        for stage in sorted({*self.stages, *STAGE_OUTPUTS} - set(stages)):
            self.forget(stage)

    def _write(self) -> None:
        write_json(self.root / MANIFEST, {"schema": MANIFEST_SCHEMA, "version": 1, "stages": self.stages})


class OriginalModel:
    """The original model, loaded on first use and shared by the stages that need it beside the
    compressed one: the speed A/B times it, the heal distils toward it (its teacher). One copy
    serves both because neither changes its weights: the A/B only runs forward passes under
    inference_mode, and heal_ only puts the teacher in eval mode with requires_grad off."""

    def __init__(self, recipe: Recipe, trust_remote_code: bool = False):
        self.recipe, self.trust_remote_code = recipe, trust_remote_code
        self._model = None

    def get(self):
        if self._model is None:
            from mi_opt.models import load_model

            self._model, _ = load_model(self.recipe.model.name, dtype=self.recipe.model.dtype,
                                        device=self.recipe.model.device, trust_remote_code=self.trust_remote_code)
        return self._model

    def release(self) -> None:
        """Let the copy go before anything is measured alone (peak memory would count it)."""
        self._model = None


@dataclass
class RunResult:
    folder: Path
    report: Path
    stages_run: list[str]
    stages_reused: list[str]


def _log(message: str) -> None:
    print(f"[mi-opt] {message}", flush=True)


def run(recipe: Recipe, out_dir: str | Path, baseline_cache: str | Path | None = None,
        progress: bool = True, trust_remote_code: bool = False, trust_task_code: bool = False) -> RunResult:
    """Run a recipe end to end into out_dir, resuming finished stages. Returns where the report is.

    trust_remote_code / trust_task_code: the user's --trust-* flags (models.py, evaluate/tasks.py);
    they are arguments, not recipe keys, because a recipe is a file someone else may have written.
    """
    from mi_opt.data import token_windows
    from mi_opt.evaluate import EvalResult, evaluate
    from mi_opt.evaluate import ab_speed
    from mi_opt.models import load
    from mi_opt.plan import CompressionPlan
    from mi_opt.policy import make_plan
    from mi_opt.profile.importance import ImportanceProfile
    from mi_opt.profile.scorers import SCORERS

    folder = RunFolder.open(out_dir)
    out = folder.root.parent  # --out: the run folder and the shared baseline cache must stay in it
    inside(folder.root, out, "run folder")
    cache = Path(baseline_cache) if baseline_cache else inside(out / "_baseline", out, "baseline cache")
    ran, reused = [], []
    spec = recipe.model.name
    # One handle for every stage: the adapter and the model's description are derived once
    # (and again only after apply_ or heal edit the model in place).
    loaded = load(spec, dtype=recipe.model.dtype, device=recipe.model.device, trust_remote_code=trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    fingerprint = model_fingerprint(model, tokenizer)  # the tokenizer makes the windows: it keys the stages too
    if recipe.export.enabled and recipe.export.format == "gguf":
        from mi_opt.formats.gguf import check_gguf_export

        check_gguf_export(model, spec, recipe.export.gguf_options())  # a refusal now, not after the evaluations
    sections = recipe.section_dict("model", "data", "profile", "policy", "evaluate")

    @functools.cache
    def windows():
        return token_windows(tokenizer, recipe.data.calibration, recipe.data.n_samples, recipe.data.seq_len,
                             split="calibration", seed=recipe.data.seed,
                             max_positions=loaded.adapter.max_positions())

    profile_key = content_hash(fingerprint, sections["model"], sections["data"], sections["profile"])
    plan_key = content_hash(profile_key, sections["policy"])
    if not (folder.done("profile", profile_key) and folder.done("plan", plan_key)):
        windows()  # an unreadable model or corpus fails here, before anything is written
    folder.root.mkdir(parents=True, exist_ok=True)
    (folder.root / "recipe.yaml").write_text(recipe.to_yaml())

    # 1. profile
    if folder.done("profile", profile_key):
        profile = ImportanceProfile.load(folder.root / "profile.json")
        reused.append("profile")
    else:
        folder.forget("profile")
        _log(f"profiling with scorer {recipe.profile.scorer!r}")
        scorer = SCORERS.get(recipe.profile.scorer)
        calibration = {"source": recipe.data.calibration, "split": "calibration", "seed": recipe.data.seed}
        profile = scorer(loaded, windows(), scorer.make_config(recipe.profile.options), calibration=calibration,
                         model_spec=spec, progress=progress)
        folder.mark("profile", profile_key, _write_profile(profile, folder.root))
        ran.append("profile")

    # 2. plan
    if folder.done("plan", plan_key):
        plan = CompressionPlan.load(folder.root / "plan.json")
        reused.append("plan")
    else:
        folder.forget("plan")
        _log(f"planning with planner {recipe.policy.planner!r}")
        plan = make_plan(profile, recipe.policy.planner, recipe.policy.options, model=loaded, windows=windows(),
                         progress=progress)
        plan.save(folder.root / "plan.json")
        folder.mark("plan", plan_key, ["plan.json"])
        ran.append("plan")
    if recipe.export.enabled and recipe.export.format == "gguf":
        from mi_opt.formats.gguf_families import check_plan_mlp_sizes

        check_plan_mlp_sizes(model, plan)  # per-layer MLP sizes: refused now, not after the evaluations

    # 3. evaluate the original (shared between runs of the same model and settings)
    base_key = content_hash(fingerprint, sections["model"], sections["evaluate"])
    base_path = cache / f"{base_key}.json"
    if base_path.exists():
        base_eval = EvalResult.load(base_path)
        reused.append("eval_original")
    else:
        _log("evaluating the original model")
        work = cache / f"{base_key}.tasks-work"  # the cache is shared: other keys' work is left alone
        base_eval = evaluate(loaded, tokenizer, recipe.evaluate, spec=spec, progress=progress,
                             trust_task_code=trust_task_code, resume_dir=work)
        base_eval.save(base_path)
        shutil.rmtree(work, ignore_errors=True)
        ran.append("eval_original")
    base_eval.save(folder.root / "eval_original.json")  # with lm-eval's own results beside it
    folder.mark("eval_original", base_key, ["eval_original.json"])

    # 4. apply and evaluate the compressed model; 5. heal it and evaluate again; 6. export it
    heal_section = recipe.section_dict("heal")["heal"]
    # A GGUF export evaluates the GGUF-quantized weights, not bitsandbytes': other measurements, other keys.
    gguf = recipe.section_dict("export")["export"] if recipe.export.format == "gguf" else None
    compressed_key = content_hash(plan_key, sections["evaluate"], *([gguf] if gguf else []))
    heal_key = content_hash(plan_key, heal_section) if recipe.heal else None
    healed_key = content_hash(heal_key, sections["evaluate"]) if recipe.heal else None
    export_key = content_hash(plan_key, heal_key, recipe.export.enabled, *([gguf] if gguf else []))
    # Speed is compared only within one A/B measurement of both models (never the cached baseline's).
    # Kept LoRA adapters add compute: the healed model is then timed in the same rounds, after the heal.
    healed_in_ab = bool(recipe.heal) and recipe.heal.adapters == "keep"
    # The artifact's version is in the key: a timing that records more, or judges reliability
    # otherwise, is measured again rather than shown with the old judgement.
    ab_key = content_hash(plan_key, sections["evaluate"], f"{ab_speed.SCHEMA}/{ab_speed.VERSION}",
                          *([gguf] if gguf else []),
                          *([heal_key] if healed_in_ab else [])) if "speed" in recipe.evaluate.parts else None
    need_ab = ab_key is not None and not folder.done("speed_ab", ab_key)
    need_healed = bool(recipe.heal) and not (
        folder.done("heal", heal_key) and folder.done("eval_healed", healed_key)
        and (not recipe.export.enabled or folder.done("export", export_key)) and not (healed_in_ab and need_ab))
    gguf_applied = None  # what apply_gguf_ put in the model: the export writes it as it is
    if not folder.done("eval_compressed", compressed_key) or need_healed or need_ab or (
            recipe.export.enabled and not folder.done("export", export_key)):
        from mi_opt.surgery import apply_

        _log("applying the plan")
        if gguf:
            from mi_opt.formats.gguf import apply_gguf_

            gguf_applied = apply_gguf_(model, plan, recipe.export.gguf_options(), tokenizer)
            loaded.changed()
        else:
            apply_(loaded, plan)

    def evaluated(stage: str, key: str, label: str, tag: str) -> EvalResult:
        """The stage's result: reused when its key matches, else the in-memory model measured now."""
        path = folder.root / f"{stage}.json"
        if folder.done(stage, key):
            reused.append(stage)
            return EvalResult.load(path)
        folder.forget(stage)
        _log(f"evaluating the {label} model")
        work = _task_work(folder.root, stage, key)
        result = evaluate(loaded, tokenizer, recipe.evaluate, spec=f"{spec} [{tag}]",
                          progress=progress, trust_task_code=trust_task_code, resume_dir=work)
        result.save(path)
        folder.mark(stage, key, [path.name])
        shutil.rmtree(work, ignore_errors=True)
        ran.append(stage)
        return result

    comp_eval = evaluated("eval_compressed", compressed_key, "compressed", recipe.name)
    original = OriginalModel(recipe, trust_remote_code)  # one copy for the A/B and the teacher
    healed_label = f"{recipe.name} healed"
    speed_ab = _speed_ab_stage(folder, ab_key, original, model, recipe, ran, reused, progress) \
        if ab_key and not healed_in_ab else None
    healed = None
    if recipe.heal:
        record = _heal_stage(folder, heal_key, model, tokenizer, recipe, plan, need_healed, ran, reused, progress,
                             original)
        loaded.changed()  # healed weights: the compressed model's description is stale
        if ab_key and healed_in_ab:
            speed_ab = _speed_ab_stage(folder, ab_key, original, model, recipe, ran, reused, progress, healed_label)
        original.release()
        healed = (evaluated("eval_healed", healed_key, "healed", f"{recipe.name}, healed"), record)
        if speed_ab and healed_label not in speed_ab["per_model"]:
            speed_ab = ab_speed.shared_timing(speed_ab, healed_label, recipe.name, _same_shapes(record))
    else:
        _remove_heal_work(folder.root)
    original.release()
    if recipe.export.enabled:
        if folder.done("export", export_key):
            reused.append("export")
        else:
            from mi_opt.export import export

            folder.forget("export")
            _log("exporting the checkpoint (verified by reload)")
            results = {"original": base_eval.to_dict(), "compressed": comp_eval.to_dict()}
            if healed:
                results["healed"] = healed[0].to_dict()
            export(model, tokenizer, plan, folder.root / "checkpoint", profile=profile, force=True,
                   eval_results=results, heal=healed[1] if healed else None, format=recipe.export.format,
                   gguf=recipe.export.gguf_options() if gguf else None, gguf_applied=gguf_applied)
            folder.mark("export", export_key, ["checkpoint"])
            ran.append("export")

    # 7. report (cheap: always rebuilt from the stage outputs, after the stale ones are gone)
    from mi_opt.report import write_report

    folder.keep_only(ran + reused)
    _record_disk_sizes(spec, base_eval, healed[0] if healed else comp_eval, folder.root / "checkpoint")

    report = write_report(folder.root, recipe, profile, plan, base_eval, comp_eval, healed, speed_ab)
    _log(f"report: {report}")
    return RunResult(folder.root, report, ran, reused)


def _speed_ab_stage(folder: RunFolder, key: str, original: OriginalModel, model, recipe: Recipe, ran: list[str],
                    reused: list[str], progress: bool, healed_label: str | None = None) -> dict:
    """The original and the compressed `model` timed together in interleaved rounds.

    healed_label: `model` has been healed and keeps its LoRA adapters unmerged, which adds
    compute: it is timed as the healed model, and with its adapters set aside (the compressed
    model's own modules, the same tensors) as the compressed one, in the same rounds."""
    from mi_opt.evaluate.ab_speed import SCHEMA, VERSION, measure_ab

    path = folder.root / "speed_ab.json"
    if folder.done("speed_ab", key):
        reused.append("speed_ab")
        return read_json(path, SCHEMA, VERSION)
    folder.forget("speed_ab")
    models, states, views = {"original": original.get(), recipe.name: model}, {}, {}
    if healed_label:
        from mi_opt.adapters import set_aside

        models[healed_label] = model
        states[recipe.name] = functools.partial(set_aside, model)
        views[recipe.name] = f"{healed_label} with its LoRA adapters set aside (the compressed model's modules)"
    _log(f"timing {', '.join(models)} together (interleaved A/B rounds)")
    ab = measure_ab(models, recipe.evaluate.speed, recipe.evaluate.device, progress, threads=recipe.evaluate.threads,
                    states=states)
    if views:
        ab["views"] = views
    write_json(path, ab)
    folder.mark("speed_ab", key, [path.name])
    ran.append("speed_ab")
    return ab


def _same_shapes(record) -> str:
    """Why a healed model computes exactly what the compressed one does, in words."""
    merged = record.trained.get("adapters") == "merged"
    return "the compressed model's shapes" + (" (its LoRA adapters merged into the weights)" if merged
                                              else " (healing changed weight values only)")


def _record_disk_sizes(spec: str, original, exported, checkpoint: Path) -> None:
    """Bytes on disk beside the in-memory sizes the evaluations measured, for the report: the
    original's weight files where it loads from a local folder, and the exported checkpoint's for
    the model it holds (the healed one when the run heals; the compressed model, never written,
    has none of its own). The eval files keep what they
    measured; only the report's results carry these (a model in fp32 in memory may be a bf16
    checkpoint on disk, half the size)."""
    from mi_opt.evaluate.speed import disk_bytes
    from mi_opt.models import resolve_model_path

    if original.speed is not None:
        path, gguf = resolve_model_path(spec)  # a hub id is no path: its size on disk stays unknown
        if gguf is not None:
            original.speed["disk_bytes"] = (Path(path) / gguf).stat().st_size
        elif isinstance(path, Path) and path.is_dir():
            original.speed["disk_bytes"] = disk_bytes(path)
    if exported.speed is not None and checkpoint.is_dir():
        exported.speed["disk_bytes"] = disk_bytes(checkpoint)


def _task_work(root: Path, stage: str, key: str) -> Path:
    """Where an evaluation keeps its finished tasks until it ends: a killed run resumes at the task
    it stopped in. Another key's folder for this stage (another model or settings) goes now."""
    work = root / f"{stage}{TASK_WORK}{key}"
    for stale in root.glob(f"{stage}{TASK_WORK}*") if root.is_dir() else ():
        if stale != work and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
    return work


def _remove_heal_work(root: Path, keep: Path | None = None) -> None:
    """Resumable distillation checkpoints of heals that finished or no longer match the recipe."""
    for work in root.glob(f"{HEAL_WORK}*"):
        if work != keep and work.is_dir() and not work.is_symlink():
            shutil.rmtree(work, ignore_errors=True)


def _heal_stage(folder: RunFolder, key: str, model, tokenizer, recipe: Recipe, plan, need_weights: bool,
                ran: list[str], reused: list[str], progress: bool, original: OriginalModel):
    """Heal the compressed `model` in place toward the original (or put back the healed weights
    of a finished heal); returns the HealRecord. A killed heal resumes from its last
    distillation checkpoint in heal-work-<key>/."""
    from mi_opt.heal import WEIGHTS, HealRecord, heal_, load_changed_, save_changed

    if folder.done("heal", key):
        _remove_heal_work(folder.root)  # left by a kill between the heal's end and this cleanup
        if need_weights:
            load_changed_(model, folder.root / WEIGHTS)
        reused.append("heal")
        return HealRecord.load(folder.root / "heal.json")
    for stage in ("heal", "eval_healed", "export"):  # new healed weights: nothing measured on old ones stays
        folder.forget(stage)
    work = folder.root / f"{HEAL_WORK}{key}"
    _remove_heal_work(folder.root, keep=work)
    _log(f"healing ({recipe.heal.method}, train {recipe.heal.train}) toward the original model")
    record = heal_(model, original.get(), plan, recipe.heal, tokenizer, work_dir=work, progress=progress)
    save_changed(model, record.changed, folder.root / WEIGHTS, record.unhealed_fingerprint)
    record.save(folder.root / "heal.json")
    folder.mark("heal", key, ["heal.json", WEIGHTS])
    shutil.rmtree(work, ignore_errors=True)
    ran.append("heal")
    return record


def _write_profile(profile, root: Path) -> list[str]:
    """profile.json and whichever plots the profile's unit kinds allow; returns the names written."""
    from mi_opt.profile.plots import head_heatmap, layer_bars

    profile.save(root / "profile.json")
    plots = [head_heatmap(profile, root / "heads.png"), layer_bars(profile, root / "layers.png")]
    return ["profile.json", *(Path(p).name for p in plots if p is not None)]
