"""The MLflow Model Registry and model URIs: register a trial's model, list, download, read weights.

Part of the tracking layer (with :mod:`wavesweep.tracking`, the only modules that import mlflow).
``register_model`` ships ``pruned_model`` and ``architectures`` with the model; ``weights_from_uri``
reads a registered or logged model's state dict without running code from it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from wavesweep.fileio import atomic_write
from wavesweep.names import check_choice
from wavesweep.redact import redact
from wavesweep.store import located, store_exists, tracking_uri
from wavesweep.tracking import client, format_value

REGISTERED_DIR = "registered-{method}"  # run-relative artifact folder of a registered model
EXPORTED_DIR = "exported"  # the pytorch flavour's folder in a registered model: model.pt2 (torch.export)


def register_model(
    model: Any, *, architecture: dict[str, Any], input_example: Any, checkpoint: Path, run_id: str, name: str,
    alias: str | None, method: str, tags: dict[str, Any],
) -> Any:
    """Save ``model`` as an ordinary PyTorch module, add it to ``run_id``'s artifacts, register it
    under ``name`` with version ``tags`` and ``alias``; returns the model version.

    The format (``pruned_model``): the state dict (tensors only, safe to load) with the
    ``architecture`` (``{"model", "num_classes", "in_channels", "image_size"}``) rebuilt by the
    shipped ``architectures.py``, plus the compressed ``checkpoint``, as an MLflow pyfunc with a
    signature from ``input_example`` (any batch size), and MLflow's ``pytorch`` flavour beside it
    (the module exported with ``torch.export``, ``pt2``: :func:`_add_pytorch_flavour`). It loads
    without wavesweep, is as large as the dense weights twice plus the checkpoint, and the pyfunc's
    module trains like any module.

    The source run is not reopened: the model is written with ``save_model`` and uploaded with
    ``log_artifacts``, so its status, end time, tags, params and metrics stay as they were. The
    folder is uploaded once per run and method: a second registration (another name) points at
    the files the first uploaded, so an earlier version's files are never rewritten.
    """
    artifact_path = REGISTERED_DIR.format(method=method)
    c = client()
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    if not _registered_source(c, run_id, source):  # else uploaded by an earlier registration: reused, never rewritten
        _upload(model, architecture, input_example, checkpoint, run_id, artifact_path)
    with contextlib.suppress(MlflowException):  # exists already
        c.create_registered_model(name)
    # marked before its first version: a stop between the two must not leave a version `wavesweep models` cannot see
    mark_wavesweep(name)
    mv = c.create_model_version(name, source, run_id=run_id, tags={k: format_value(v) for k, v in tags.items() if v is not None})
    return move_alias(c.get_model_version(name, mv.version), alias)


def mark_wavesweep(name: str) -> None:
    """Tag registered model ``name`` as wavesweep's (``wavesweep=true``): what :func:`list_registered` lists."""
    client().set_registered_model_tag(name, "wavesweep", "true")


def _versions_of_run(c: Any, run_id: str) -> list[Any]:
    """Every model version (under any name) registered from ``run_id``."""
    return list(c.search_model_versions(filter_string=f"run_id = '{run_id}'"))  # run ids are hex: safe in a filter


def _registered_source(c: Any, run_id: str, source: str) -> bool:
    """Whether a model version (under any name) already points at ``source``: its upload finished."""
    return any(mv.source == source for mv in _versions_of_run(c, run_id))


def existing_version(name: str, run_id: str, method: str) -> Any | None:
    """The version of registered model ``name`` made from ``run_id``'s ``method`` model, if any."""
    c = client()
    try:
        found = _versions_of_run(c, run_id)
    except MlflowException:
        return None
    mine = [mv for mv in found if mv.name == name and (mv.tags or {}).get("method") == method]
    return c.get_model_version(name, min(mine, key=lambda mv: int(mv.version)).version) if mine else None


def move_alias(mv: Any, alias: str | None) -> Any:
    """Point ``alias`` of ``mv``'s registered model at ``mv``; returns the version as stored."""
    if not alias:
        return mv
    c = client()
    c.set_registered_model_alias(mv.name, alias, mv.version)
    return c.get_model_version(mv.name, mv.version)


def saved_copy(sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` as CPU copies for ``torch.save``: each tensor its own storage (a view of a larger
    one would drag all of it into the file), a tensor listed under several keys (tied weights)
    copied once and listed under each, so the file holds it once and loads it tied."""
    from wavesweep.checkpoint import shared_keys

    alias = shared_keys(sd)
    out: dict[str, Any] = {}
    for k, v in sd.items():
        out[k] = out[alias[k]] if k in alias else v.detach().cpu().clone()
    return out


def _upload(model: Any, architecture: dict[str, Any], input_example: Any, checkpoint: Path, run_id: str,
            artifact_path: str) -> None:
    import torch
    from mlflow.models import infer_signature

    from wavesweep import architectures, pruned_model

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        torch.save(saved_copy(model.state_dict()), data / pruned_model.STATE_DICT)
        (data / pruned_model.ARCHITECTURE).write_text(json.dumps(architecture, indent=2))
        shutil.copyfile(checkpoint, data / Path(checkpoint).name)
        model.eval()
        with torch.no_grad():
            output = model(torch.as_tensor(input_example)).numpy()
        folder = Path(tmp) / "model"
        source = Path(pruned_model.__file__).read_bytes()
        loader = Path(tmp) / "loader" / f"{pruned_model.loader_module(source)}.py"  # shipped under a name of its contents
        loader.parent.mkdir()
        loader.write_bytes(source)
        mlflow.pyfunc.save_model(
            str(folder), loader_module=loader.stem, data_path=str(data),
            code_paths=[str(loader), architectures.__file__],
            signature=infer_signature(input_example, output), input_example=input_example,
            pip_requirements=_pip_requirements(),
        )  # fmt: skip
        _add_pytorch_flavour(model, input_example, folder)
        client().log_artifacts(run_id, str(folder), artifact_path)


def _add_pytorch_flavour(model: Any, input_example: Any, folder: Path) -> None:
    """Add MLflow's ``pytorch`` flavour to the saved model in ``folder``: the module exported with
    ``torch.export`` (``pt2``, MLflow 3's pickle-free format), its batch axis free, so that
    ``mlflow.pytorch.load_model(uri)`` gives an inference module of any batch size in a process
    with torch alone (an exported module: ``.train()`` is not supported; the trainable module is
    the pyfunc's ``get_raw_model()``). Written as ``mlflow.pytorch.save_model(...,
    serialization_format="pt2")`` writes it (``model_data`` a folder holding ``model.pt2``), beside
    the pyfunc flavour that stays wavesweep's own loader."""
    import torch
    from mlflow.models import Model
    from torch.export import Dim

    example = torch.as_tensor(input_example)
    if example.shape[0] < 2:  # torch.export specializes a size-1 axis: traced at batch 1 it is no Dim (a one-example eval set)
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: Dim("batch", min=1)},))
    (folder / EXPORTED_DIR).mkdir()
    torch.export.save(program, folder / EXPORTED_DIR / "model.pt2")
    mlmodel = Model.load(str(folder / "MLmodel"))
    mlmodel.add_flavor("pytorch", model_data=EXPORTED_DIR, pytorch_version=str(torch.__version__), code=None)
    mlmodel.model_size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    mlmodel.save(str(folder / "MLmodel"))


def _pip_requirements() -> list[str]:
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}", "numpy",
            f"mlflow=={mlflow.__version__}"]


def list_registered() -> list[dict[str, Any]]:
    """Registered wavesweep models with their versions' aliases and tags.

    No filter string is built from a model's name (a name with a quote must not break the
    listing): versions are read page by page and grouped by name here."""
    if not store_exists():
        return []
    c = client()
    mine: dict[str, Any] = {}
    token = None
    while True:  # page by page: one call returns at most 100 models
        page = c.search_registered_models(filter_string="tags.wavesweep = 'true'", max_results=1000, page_token=token)
        mine |= {rm.name: rm for rm in page}
        token = page.token
        if not token:
            break
    by_name: dict[str, list[Any]] = {}
    token = None
    while mine:
        page = c.search_model_versions(max_results=1000, page_token=token)
        for mv in page:
            if mv.name in mine:
                by_name.setdefault(mv.name, []).append(mv)
        token = page.token
        if not token:
            break
    out = []
    for name in mine:
        # search results carry no aliases: read them (alias -> version) from the model itself
        aliases = c.get_registered_model(name).aliases or {}
        for mv in sorted(by_name.get(name, []), key=lambda v: -int(v.version)):
            mine_aliases = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
            out.append({"name": name, "version": mv.version, "aliases": mine_aliases, "tags": dict(mv.tags),
                        "run_id": mv.run_id})  # fmt: skip
    return out


def _not_found(uri: str, exc: MlflowException) -> str:
    """Why MLflow could not fetch ``uri``: for a ``models:/`` URI whose model, alias or version does
    not exist, the bad one and the choices (``names.check_choice``); for one that names neither a
    version nor an alias, both lists; else MLflow's first line."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not uri.startswith("models:/"):
        return detail
    head, _, ref = uri[len("models:/") :].strip("/").partition("/")
    name, _, alias = head.rpartition("@") if "@" in head else (head, "", "")
    version = ref.split("/", 1)[0]
    c = client()
    try:
        try:
            aliases = sorted(c.get_registered_model(name).aliases or {})
        except MlflowException:
            names, token = [], None
            while True:  # page by page, as list_registered
                page = c.search_registered_models(max_results=1000, page_token=token)
                names += [rm.name for rm in page]
                token = page.token
                if not token:
                    break
            check_choice("registered model", name, sorted(names) or ["(none registered)"])
        else:
            if alias:
                check_choice(f"alias of {name}", alias, aliases or ["(none set)"])
            elif version.lower() not in ("latest", "none", "staging", "production", "archived"):  # else MLflow's words
                found = sorted(int(mv.version) for mv in c.search_model_versions(f"name = '{name}'"))
                versions = [str(v) for v in found] or ["(none registered)"]
                if not version:  # MLflow 3 reads models:/NAME as the id of a logged model
                    return (f"no version or alias of {name} given: models:/{name}/VERSION (versions: {', '.join(versions)}) "
                            f"or models:/{name}@ALIAS (aliases: {', '.join(aliases) or 'none set'})")  # fmt: skip
                check_choice(f"version of {name}", version, versions)
    except ValueError as bad:
        return str(bad)
    except MlflowException:  # the store itself failed: MLflow's words
        pass
    return detail


def download(uri: str, dst: Path, *, force: bool = False) -> Path:
    """Download a model (``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/...``) as files into ``dst``.

    Reads only: no store, experiment or folder is created unless the download succeeds. Files
    that already exist in ``dst`` are not overwritten unless ``force`` (``ValueError`` naming the
    first), and a file where the download needs a folder (or a folder where it puts a file) is
    refused, ``force`` or not; the files are fetched into a temporary folder first, and the files
    and folders moved into ``dst`` are taken away again if moving them fails, so a failed download
    leaves ``dst`` as it was (but for files ``force`` overwrote). Returns the downloaded file or
    folder inside ``dst``."""
    import shutil

    if not uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        raise ValueError(f"cannot download {uri!r}: give models:/NAME@alias, models:/NAME/VERSION or runs:/RUN_ID/path")
    if ".." in uri.replace("\\", "/").split("/"):
        raise ValueError(f"cannot download {uri!r}: '..' is not allowed in an artifact URI")
    if not store_exists():
        raise ValueError(f"no MLflow store at {redact(tracking_uri())}: nothing to download (set MLFLOW_TRACKING_URI?)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except MlflowException as exc:
            raise ValueError(f"cannot download {uri}: {_not_found(uri, exc)}") from None
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        targets = {f: dst / f.relative_to(tmp) for f in files}
        # a file where the download needs a folder (dst, a folder above it or inside it), or a folder
        # where it puts a file: refused before anything is moved, --force or not
        blocked = sorted({p for t in targets.values() for p in (t, *t.parents) if (p.is_dir() if p == t else p.exists() and not p.is_dir())})
        if blocked:
            what, needs = ("a folder", "a file") if blocked[0].is_dir() else ("a file", "a folder")
            raise ValueError(f"{blocked[0]} is {what} where the download of {uri} needs {needs}: give another --dst or move it")
        existing = [t for t in targets.values() if t.exists()]
        if existing and not force:
            raise ValueError(f"{existing[0]} exists ({len(existing)} file(s) would be overwritten); pass --force to overwrite")
        made = {p for t in targets.values() for p in t.parents if not p.exists()}  # the folders this download creates
        moved: list[Path] = []
        try:
            for src, target in targets.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                if target not in existing:
                    moved.append(target)  # before the move: a copy cut short leaves a part of it
                shutil.move(str(src), str(target))
        except BaseException:  # a full disk, a stop: the files and folders this download added are taken away again
            for target in moved:
                target.unlink(missing_ok=True)
            for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # empty folders only: never anything of anyone else's
            raise
        return dst / local.relative_to(tmp)


def resolve_model_uri(uri: str) -> str:
    """``uri`` pinned to what it means now: ``models:/NAME@alias`` and ``models:/NAME/latest`` (any
    case, as MLflow reads it) become ``models:/NAME/VERSION`` (read from the registry), a path
    after either kept (``models:/NAME@alias/PATH`` -> ``models:/NAME/VERSION/PATH``); version and
    ``runs:/`` URIs are returned as given.

    An alias can move between two trials; pinning it first is what keeps a cache keyed by URI
    from serving the old version under the new alias."""
    if not uri.startswith("models:/"):
        return uri
    rest = uri[len("models:/") :].strip("/")
    c = client()
    try:
        head, _, tail = rest.partition("/")
        if "@" in head:
            name, alias = head.rsplit("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
            return f"models:/{name}/{mv.version}" + (f"/{tail}" if tail else "")
        name = head
        ref, _, path = tail.partition("/")
        if ref.lower() == "latest":
            versions = c.get_registered_model(name).latest_versions or []
            if not versions:
                raise ValueError(f"{uri}: registered model {name!r} has no versions")
            return f"models:/{name}/{max(int(v.version) for v in versions)}" + (f"/{path}" if path else "")
    except MlflowException as exc:
        raise ValueError(f"{uri}: {_not_found(uri, exc)}") from None
    return uri


def _version_identity(uri: str) -> str:
    """What ``models:/NAME/VERSION[/path]`` is in the registry now: its source, run and creation
    time; ``""`` for any other URI, or a version the registry does not have (its download fails)."""
    if not uri.startswith("models:/"):
        return ""
    name, _, ref = uri[len("models:/") :].strip("/").partition("/")
    version = ref.split("/", 1)[0]
    if not version.isdigit():
        return ""
    try:
        mv = client().get_model_version(name, version)
    except MlflowException:
        return ""
    return f"{mv.source}|{mv.run_id}|{mv.creation_timestamp}"


#: file name suffixes looked at in a downloaded model, in order of preference
_WEIGHT_SUFFIXES = (".wsz", ".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def weights_from_uri(uri: str, cache: Path) -> tuple[Path, str]:
    """A registered or logged model's state dict as a local file, without running code from it.

    ``uri`` is resolved first (:func:`resolve_model_uri`), then its files are downloaded and the
    weights read from one file of a format that cannot execute code: wavesweep's ``.wsz``
    checkpoint (shipped with every model ``wavesweep register`` creates), a ``.safetensors``
    file, or a state dict read with ``torch.load(weights_only=True)``. Anything else, such as
    MLflow's pickle-format pytorch model, is refused with a one-line ValueError. NaN or infinite
    weights are refused too. Returns ``(state-dict file in cache, resolved uri)``; the file is
    cached by the store's location, the resolved uri and, for a model version, its source
    and creation time.
    """
    import hashlib

    import torch

    from wavesweep import models

    resolved = resolve_model_uri(uri)
    # The key names the store by where it is (the default ``sqlite:///mlflow.db`` is relative: two
    # projects' stores would share one key) and a version by what it is: a registered model deleted
    # and made again numbers its versions from 1 anew.
    # "meta": entries written before the weights kept their record (a plain state dict) are not reused
    key = hashlib.sha256(f"meta|{located(tracking_uri())}|{resolved}|{_version_identity(resolved)}".encode()).hexdigest()[:24]
    path = cache / "uri-weights" / f"{key}.pt"
    if path.exists():
        return path, resolved
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=resolved, dst_path=tmp))
        except MlflowException as exc:
            raise ValueError(f"{resolved}: {_not_found(resolved, exc)}") from None
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        candidates = sorted((p for p in files if p.suffix in _WEIGHT_SUFFIXES), key=lambda p: _WEIGHT_SUFFIXES.index(p.suffix))
        pyfunc = {}
        if (local / "MLmodel").is_file():
            pyfunc = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors", {}).get("python_function", {})
        from wavesweep import pruned_model

        if pruned_model.is_wavesweep_loader(pyfunc.get("loader_module")):  # registered by wavesweep: its exact state dict
            candidates = [local / pyfunc["data"] / pruned_model.STATE_DICT]
        if not candidates:
            raise ValueError(f"{resolved}: no weights file in it; wavesweep reads {models.SAFE_FORMATS}")
        best = [p for p in candidates if p.suffix == candidates[0].suffix]
        if len(best) > 1:
            names = ", ".join(str(p.relative_to(local)) for p in best[:4])
            raise ValueError(f"{resolved}: several weights files ({names}); give the one to use, e.g. {resolved.rstrip('/')}/{best[0].relative_to(local)}")
        rel = best[0].name if local.is_file() else str(best[0].relative_to(local))
        try:
            state, meta = models.read_weights(best[0])
            models.check_finite(state, source=f"{resolved} ({rel})")
            if pruned_model.is_wavesweep_loader(pyfunc.get("loader_module")) and (shipped := sorted((local / pyfunc["data"]).glob("*.wsz"))):
                from wavesweep import checkpoint  # what the checkpoint it was decoded from records: its trial, dataset

                header = checkpoint.read_header(shipped[0])
                meta = {"format": "wsz", "checkpoint": {k: header.get(k) for k in ("method", "config", "user")}}
        except ValueError as exc:  # name the artifact, not the temporary download folder
            where = f"{resolved} ({rel})"
            msg = str(exc).replace(f"weights file {str(best[0])!r}", where).replace(str(best[0]), where)
            raise ValueError(msg) from None
    # What the weights record of their making (the dataset of the trial or training) stays with them,
    # in wavesweep's {"state_dict", "meta"} form: the base model's checks read it as from a file.
    kept = {k: v for k, v in meta.items() if k != "format"}
    with atomic_write(path) as fh:
        torch.save({"state_dict": saved_copy(state), "meta": json.dumps(kept)} if kept else saved_copy(state), fh)
    return path, resolved
