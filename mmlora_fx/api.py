"""`mmlora_fx.compile(model, adapters)`: a model that runs a different LoRA adapter per request."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .adapter_manager import AdapterStats
from .backend import MMLoRABackend, our_errors_unwrapped
from .errors import BatchError, DefaultAdapterError, VerificationError
from .runtime import LoRARuntime, ServingOptions

__all__ = ["compile", "MultiLoRAModel"]

# Inputs that are media for a tower (pixels, audio features): floating, two or more dims; not these.
_NOT_MEDIA = ("inputs_embeds",)
# verify()'s default tolerance by output dtype: float32 as the tests hold PEFT; half precision
# leaves room for the compiled base's own rounding differences (a few percent in bfloat16).
_DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _first_output(output) -> torch.Tensor:
    """The logits of a Hugging Face output, or the first tensor of any other output."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise VerificationError(f"cannot compare outputs of type {type(output).__name__}: expected logits or a tensor",
                            [], 0.0)


class MultiLoRAModel:
    """A model compiled with LoRA ops on every served linear of its tower, connector and LM.

    Call it like the model, with one adapter name per request: `mm(**batch, adapter_names=[...])`;
    None and "__base__" mean the base model. The model itself is compiled in place (its
    `__call__` goes through the compiled graphs), so Hugging Face generation uses the graphs too.
    """

    def __init__(self, model: nn.Module, runtime: LoRARuntime, backend: MMLoRABackend, cuda_graphs: bool = False,
                 verbose: bool = False):
        self.model = model
        self.runtime = runtime
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.verbose = verbose

    def _served_call(self):
        """The scope of a call through the compiled graphs: LoRA hooks on, dynamo quiet, progress."""
        scope = contextlib.ExitStack()
        scope.enter_context(self.runtime.call_scope())
        scope.enter_context(self.backend.progress.call(self.backend.records, self.verbose,
                                                       in_gemm=len(self.runtime.folds) > 0
                                                       or self.runtime.options.fused_gemv))
        scope.enter_context(our_errors_unwrapped())
        return scope

    # ------------------------------------------------------------------ running
    def _prepare(self, batch: Mapping, adapter_names: Sequence[str | None] | None,
                 images_per_request: Sequence[int] | None = None,
                 items_per_request: Mapping[str, Sequence[int]] | None = None) -> None:
        input_ids = batch.get("input_ids")
        if adapter_names is None:
            requests = input_ids.shape[0] if input_ids is not None else 1
            adapter_names = [None] * requests
        has_images = any(isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2
                         and key not in _NOT_MEDIA for key, value in batch.items())
        if batch.get("pixel_values_videos") is not None and not self.runtime.video_token_ids:
            raise BatchError("the batch has videos, but this model's config names no video token (video_token_id): "
                             "which request owns the vision tower's video rows cannot be told")
        items = dict(items_per_request or {})
        if images_per_request is not None:
            if "image" in items:
                raise BatchError("images per request given twice (images_per_request and items_per_request['image']): "
                                 "give them once")
            items["image"] = images_per_request
        self.runtime.prepare(adapter_names, input_ids, has_images, inputs=batch, items_per_request=items)

    def __call__(self, *args, adapter_names: Sequence[str | None] | None = None,
                 images_per_request: Sequence[int] | None = None,
                 items_per_request: Mapping[str, Sequence[int]] | None = None, **batch):
        """`images_per_request` (optional) says how many images each request holds, for batches whose
        image tokens cannot say it (a request's images with no text token between them);
        `items_per_request` does the same for any modality, by its tokens' name: `{"audio": [1, 0, 2]}`
        (Voxtral's 30-second chunks of one clip, say)."""
        if args:
            raise TypeError("pass the batch as keyword arguments (input_ids=..., pixel_values=...)")
        self._prepare(batch, adapter_names, images_per_request, items_per_request)
        if self.cuda_graphs:
            # Each call is a new step: CUDA-graph trees may then reuse the last call's output
            # memory (clone what you keep) instead of recording a new graph per call.
            torch.compiler.cudagraph_mark_step_begin()
        with self._served_call():
            output = self.model(**batch)
        self._check_coverage()
        return output

    def _check_coverage(self) -> None:
        self.runtime.check_streams()  # only what ran in Python this call: replays leave nothing to check
        if not self.cuda_graphs:  # replays call no Python: nothing to count
            self.runtime.check_coverage()

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None,
                 images_per_request: Sequence[int] | None = None,
                 items_per_request: Mapping[str, Sequence[int]] | None = None, **kwargs):
        """Hugging Face `generate` with one adapter per request (prefill with images, decode without)."""
        if args:
            raise TypeError("pass the batch as keyword arguments (input_ids=..., pixel_values=...)")
        self._prepare({key: value for key, value in kwargs.items() if isinstance(value, torch.Tensor)},
                      adapter_names, images_per_request, items_per_request)
        with self._served_call():
            output = self.model.generate(**kwargs)
        self._check_coverage()
        return output

    def eager(self, *args, adapter_names: Sequence[str | None] | None = None,
              images_per_request: Sequence[int] | None = None,
              items_per_request: Mapping[str, Sequence[int]] | None = None, **batch):
        """The same forward without compilation (LoRA through the runtime's forward hooks): the
        reference the compiled graphs must equal."""
        if args:
            raise TypeError("pass the batch as keyword arguments (input_ids=..., pixel_values=...)")
        self._prepare(batch, adapter_names, images_per_request, items_per_request)
        with self.runtime.call_scope():
            output = self.model.forward(**batch)
        self.runtime.check_streams()
        return output

    def verify(self, *args, adapter_names: Sequence[str | None] | None = None, tolerance: float | None = None,
               images_per_request: Sequence[int] | None = None,
               items_per_request: Mapping[str, Sequence[int]] | None = None, **batch) -> list[float]:
        """Run the batch through the compiled graphs and through `eager`; return, per request, the
        maximum relative error of the compiled output against the eager one.

        Raises `VerificationError` when a request's error is above `tolerance` (by default 1e-4 in
        float32, 1e-2 in float16, 5e-2 in bfloat16: the dtype of the output). A failure means this
        model and these inputs come out differently compiled and eager: an upstream torch.compile
        discrepancy (compare the base model under `torch.compile(model, backend="eager")` with its
        eager forward to tell) or an mmlora_fx bug (please report it).
        """
        if args:
            raise TypeError("pass the batch as keyword arguments (input_ids=..., pixel_values=...)")
        with torch.no_grad():
            with self.runtime.recording_applied() as applied_compiled:
                compiled = _first_output(self(**batch, adapter_names=adapter_names,
                                              images_per_request=images_per_request,
                                                 items_per_request=items_per_request)).detach().clone()
            with self.runtime.recording_applied() as applied_eager:
                eager = _first_output(self.eager(**batch, adapter_names=adapter_names,
                                                 images_per_request=images_per_request,
                                                 items_per_request=items_per_request)).detach()
        if compiled.shape != eager.shape:
            raise VerificationError(f"the compiled output has shape {tuple(compiled.shape)}, the eager one "
                                    f"{tuple(eager.shape)}", [], 0.0)
        if tolerance is None:
            tolerance = _DEFAULT_TOLERANCE.get(eager.dtype, 1e-4)
        compiled, eager = compiled.float(), eager.float()
        errors = [((c - e).abs().max() / e.abs().max().clamp_min(torch.finfo(torch.float32).tiny)).item()
                  for c, e in zip(compiled, eager)]
        names = list(adapter_names) if adapter_names is not None else [None] * len(errors)
        failed = [row for row, error in enumerate(errors) if not error <= tolerance]  # NaN fails too
        if failed:
            worst = max(failed, key=lambda row: errors[row] if errors[row] == errors[row] else float("inf"))
            missing = sorted(applied_eager - applied_compiled) if not self.cuda_graphs else []
            raise VerificationError(
                (f"served modules the compiled path did not give their LoRA: {missing}. " if missing else "") +
                f"compiled and eager outputs differ for request(s) {failed} of {len(errors)}: request {worst} "
                f"(adapter {names[worst] if worst < len(names) else None!r}) is off by {errors[worst]:.3g} relative, "
                f"above the tolerance {tolerance:g}. Either torch.compile itself gives this model and these inputs "
                "another result (compare the base model compiled with backend='eager' against its eager forward), "
                "or mmlora_fx served a request wrongly (please report it)", errors, tolerance)
        return errors

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        """The names of the loaded adapters."""
        return self.runtime.manager.names

    def load_adapter(self, name: str, path, pin: bool = False) -> None:
        self.runtime.manager.load(name, path, pin=pin)

    def load_adapters(self, folder) -> list[str]:
        """Load every adapter directory in `folder` under its directory's name (a progress bar when
        there are many); see `AdapterManager.load_folder` for what happens to bad ones."""
        return self.runtime.manager.load_folder(folder)

    def reload_adapter(self, name: str, path=None) -> None:
        """New weights under a loaded name (from `path`, or its directory read again): served from
        the next call on, whichever tier held the old ones."""
        self.runtime.manager.reload(name, path)

    def prefetch(self, adapter_names: Sequence[str | None]) -> None:
        """Announce the adapters the next calls will name (a batch's names, or any list): those
        not in the CPU cache are read (in the background on a GPU: this returns at once) and
        copied into free GPU slots on a side stream while the current step runs, so the call
        that names them does not wait. Slots the last call reads, pinned and announced adapters
        are never taken; with none left the copy is made at that call (`stats().prefetch_deferred`).
        An unknown name raises `UnknownAdapterError`; a background read's error is raised by the
        next call or prefetch naming that adapter."""
        self.runtime.manager.prefetch(adapter_names)

    def stats(self) -> AdapterStats:
        """A copy of the adapter tiers' counters: hits, misses and evictions per tier, disk reads
        and slot writes with their seconds, prefetch hits, waits, deferrals and failures."""
        return dataclasses.replace(self.runtime.manager.stats)

    def unload_adapter(self, name: str) -> None:
        defaulting = self.runtime.defaults.items_defaulting_to(name)
        if defaulting:
            raise DefaultAdapterError(name, f"is the default adapter for {' and '.join(defaulting)} requests: "
                                            "set another default (set_default_adapter) before unloading it")
        self.runtime.manager.unload(name)

    @property
    def default_adapters(self) -> dict[str, str]:
        """The default adapter of each modality ({"image": name}): requests that carry that modality
        and name no adapter (None) get it; "__base__" still means the base model."""
        return self.runtime.defaults.as_dict()

    def set_default_adapter(self, item: str, name: str | None) -> None:
        """Make the loaded adapter `name` the default for requests carrying `item` ("image",
        "audio"); None removes the default."""
        self.runtime.defaults.set(item, name)

    def adapter_names_for(self, adapter_names: Sequence[str | None], input_ids: torch.Tensor) -> list[str | None]:
        """The names a batch with these `input_ids` runs with, defaults applied: what a decode loop
        driven by hand passes for the steps after its prefill (decode steps carry no media tokens)."""
        return self.runtime.names_with_defaults(adapter_names, input_ids)

    def pin_adapter(self, name: str) -> None:
        self.runtime.manager.pin(name)

    def unpin_adapter(self, name: str) -> None:
        self.runtime.manager.unpin(name)

    @property
    def compiled_graphs(self) -> int:
        """How many graphs were compiled so far; adapter changes must not add to it."""
        return self.backend.graphs


def _isolated(compile_kwargs: dict) -> dict:
    """`torch.compile` keywords that keep this model's compiled code apart from other compilations.

    Dynamo keeps one cache per code object for every `torch.compile` in the process. Once a
    shared code object (transformers' forward wrappers are shared by every model) hits the
    recompile limit, dynamo marks it run-only, and run-only frames take any cached entry whose
    guards pass, whatever backend compiled it: another model's plain graphs, without LoRA (#21).
    torch 2.13's `isolate_recompiles=True` gives this compilation a region of its own."""
    import inspect

    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        return {"isolate_recompiles": True, **compile_kwargs}
    return dict(compile_kwargs)


def compile(
    model: nn.Module,
    adapters: Mapping[str, object] | None = None,
    *,
    max_loras: int = ServingOptions.max_loras,
    max_lora_rank: int = ServingOptions.max_lora_rank,
    max_cpu_loras: int | None = ServingOptions.max_cpu_loras,
    max_batch_size: int = ServingOptions.max_batch_size,
    partitions: Sequence[str] | None = None,
    target_modules: Sequence[str] | None = None,
    partition_overrides: Mapping[str, str] | None = None,
    default_adapters: Mapping[str, str] | None = None,
    prefetch_workers: int | None = None,
    tp_lora_a: str = ServingOptions.tp_lora_a,
    fold_min_rows: int | None = ServingOptions.fold_min_rows,
    stack_max_rows: int | None = ServingOptions.stack_max_rows,
    stack_expand: str = ServingOptions.stack_expand,
    stack_shrink: str = ServingOptions.stack_shrink,
    fused_gemv: bool = ServingOptions.fused_gemv,
    inner: str = "inductor",
    mode: str | None = None,
    options: Mapping | None = None,
    verbose: bool = False,
    **compile_kwargs,
) -> MultiLoRAModel:
    """Compile `model` to serve `adapters` ({name: PEFT adapter directory}) per request.

    `max_loras` adapters can be in one batch (GPU slots), `max_cpu_loras` stay cached on the CPU;
    `max_lora_rank` sizes the slot buffers. `partitions` (tower, connector, language_model, and
    `tower:audio` and the like) and `target_modules` (module-name suffixes) restrict where LoRA is
    served, for every adapter; by default, everything the given adapters target.
    `partition_overrides` ({prefix: partition}) corrects the discovered partitions.
    `default_adapters` ({"image": name, "audio": name}) serves requests that carry that modality
    and name no adapter (None) with that adapter; "__base__" still means the base model.
    `prefetch_workers` adapter files are read at once by `prefetch` on a GPU (default min(4, cores)).
    `tp_lora_a`, on a tensor-parallel model: `"replicated"` (default) keeps the LoRA A of
    column-parallel targets whole on every rank; `"sharded"` splits it along the rank (each rank
    shrinks by `max_lora_rank / ranks` rows, then one all-gather of the `[rows, max_lora_rank]`
    shrink per target and call; `max_lora_rank` must be a multiple of the ranks); `"auto"` is
    `"replicated"` until a rule is measured on GPUs. Row-parallel targets are unchanged.
    `fold_min_rows` (default None: off; experimental; measured on one prefill case so far) folds
    LoRA into the base GEMM of each served linear whose output is at least as wide as its input,
    in graphs that call it on at least that many rows known at compile time (prefill with
    `dynamic=False`): the expand becomes extra columns of the GEMM's K, with no pass over the
    outputs (`folding.py`). Those linears' weights become views of buffers `slots x rank` columns
    wider. Other calls keep the LoRA kernels, and so does every call where `max_loras x
    max_lora_rank` exceeds `folding.FOLD_MAX_WIDTH` (256; the fold's work grows with it, and past it
    the fold is estimated to cost more than the kernels: a warning says so). `stack_max_rows` (default None: off; experimental,
    measured per layer and in the decode step, where it pays at batch 16 and not yet at 1) computes the shrink of each served plain linear inside its base
    GEMM, every slot's A stacked under the weight, in graphs that call it on at most that many
    rows known at compile time (decode): one LoRA launch per sibling group is left, at the price of
    reading every slot's A each call. `stack_expand`: who adds the stacked calls' expand,
    `"kernel"` (default: one Triton launch per sibling group) or `"inductor"` (experimental, slower
    than the kernels on an H100: tensor ops in the graph that Inductor fuses into the kernels reading the
    outputs, for the language model's calls up to `max_lora_rank=16`; each slot's B then also
    sits beside those weights). `stack_shrink` (experimental, with `stack_expand="inductor"`):
    `"inductor"` makes those calls' shrink tensor ops as well, each row's own slot's A read (not
    every slot's) in one `[rows, rank]` reduction a call, a kernel that siblings share; their GEMMs
    stay the base's. `"inductor_columns"` sums per rank column instead, so that Inductor can fuse
    the shrink into the kernel producing the input, at a far longer compile (~7x the kernels'
    first call on an H100). Default `"gemm"`: the stacked GEMM.
    `fused_gemv` (default False; experimental: one workspace, so one stream at a time) runs
    each language-model linear call on one row known at compile time (decode at batch 1, compiled
    with `dynamic=False`) as one kernel, the base GEMV with the row's LoRA inside
    (`kernels/gemv_lora.py`): no LoRA launch at all. These are
    `runtime.ServingOptions`, which the `mmlora` backend takes too (all but `fold_min_rows`,
    `stack_max_rows`, `stack_expand` and `stack_shrink`). `inner` is the compiler of the rewritten graphs (Inductor
    by default), `mode` and `options` are Inductor's, and other keywords go to `torch.compile`.
    `verbose` lets dynamo's own messages (graph breaks) through; by default a call that compiles
    prints one summary line instead (the `mmlora_fx` logger, level INFO).
    """
    serving = ServingOptions(max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
                             max_batch_size=max_batch_size, partitions=partitions, target_modules=target_modules,
                             partition_overrides=partition_overrides, default_adapters=default_adapters,
                             prefetch_workers=prefetch_workers, tp_lora_a=tp_lora_a, fold_min_rows=fold_min_rows,
                             stack_max_rows=stack_max_rows, stack_expand=stack_expand, stack_shrink=stack_shrink,
                             fused_gemv=fused_gemv)
    runtime = LoRARuntime(model, adapters, serving)
    backend = MMLoRABackend(runtime, inner=inner, mode=mode, config_patches=options)
    model.compile(backend=backend, **_isolated(compile_kwargs))
    from torch._inductor import list_mode_options

    cuda_graphs = bool({**(list_mode_options(mode) if mode else {}), **(options or {})}.get("triton.cudagraphs"))
    return MultiLoRAModel(model, runtime, backend, cuda_graphs=cuda_graphs, verbose=verbose)
