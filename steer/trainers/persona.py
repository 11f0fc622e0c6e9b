"""PersonaTrainer: train a SoftPromptNetwork (and optionally an LM adapter) so that an LM answers survey
questions like a persona.

Examples are described in :mod:`steer.persona.collator`. With ``target`` (the group path) the loss is the
cross-entropy between that real distribution and the model's option distribution (the option letters'
first-token probabilities, renormalised: what ``option_probs`` and the evaluation read); without it, the
cross-entropy of the answer letter's tokens only. What trains: the soft-prompt network; with
``lm_adapter: lora`` also a LoRA adapter on the LM (and with ``lm_adapter_gate`` its persona gate,
:mod:`steer.persona.adapter`); with ``train_persona_vectors`` a table of user vectors initialised from the
embedder. Checkpoints hold just those weights (safetensors, the adapter in PEFT format) next to the Trainer's
optimizer / scheduler / RNG state, so ``resume_from_checkpoint`` continues exactly.

The config is :class:`~steer.trainers.persona_config.PersonaConfig`, the collator
:class:`~steer.persona.collator.PersonaCollator`, the trained module
:class:`~steer.persona.modeling.PersonaSoftPromptModel`. :func:`steer.scripts.persona.train_persona` runs the
whole recipe; the data preparation lives in :mod:`steer.persona.data`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer

from steer.errors import UserInputError
from steer.io import atomic_save_file, atomic_write_json
from steer.persona.adapter import (
    ADAPTER_DIR,
    PersonaGate,
    add_lm_adapter,
    has_lm_adapter,
    load_adapter_weights,
    lora_modules,
    save_lm_adapter,
)
from steer.persona.collator import EXAMPLE_COLUMNS, PersonaCollator
from steer.persona.modeling import PersonaOutput, PersonaSoftPromptModel, group_contrast
from steer.persona.soft_prompt import SoftPromptNetwork
from steer.persona.steering import FORMAT_NAME
from steer.trainers import sharding
from steer.trainers.persona_config import PersonaConfig

logger = logging.getLogger(__name__)

__all__ = [
    "PersonaCollator",
    "PersonaConfig",
    "PersonaOutput",
    "PersonaSoftPromptModel",
    "PersonaTrainer",
    "group_contrast",
    "load_user_vectors",
]

USER_VECTORS_NAME = "user_vectors.safetensors"


class PersonaTrainer(Trainer):
    """Trains the soft-prompt network (+ optionally an LM adapter and the user vectors) of an LM.

    Args:
        model: the base causal LM (its own weights stay frozen) or a name for :func:`steer.models.load_causal_lm`;
            with ``lm_adapter: lora`` it is wrapped with a fresh LoRA adapter (see :attr:`lm`).
        args: a :class:`PersonaConfig`.
        train_dataset / eval_dataset: persona examples (see the module docstring).
        processing_class: the tokenizer (loaded with the model when ``model`` is a name).
        network: an existing :class:`SoftPromptNetwork` (default: a new one shaped from ``args``).
        persona_dim: size of the persona vectors (inferred from ``user_vectors`` or the data when omitted).
        user_vectors: ``[num_users, persona_dim]`` table for examples that carry ``user_index``.
        contrast_scale: the data's mean squared between-group deviation, normalising the group-contrast term
            (``contrast_weight > 0``); default: each batch's own.
    """

    _tag_names = ["steer", "persona"]
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model,
        args: PersonaConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        network: SoftPromptNetwork | None = None,
        persona_dim: int | None = None,
        user_vectors: torch.Tensor | None = None,
        contrast_scale: float | None = None,
        data_collator=None,
        callbacks=None,
        **kwargs,
    ) -> None:
        args = args or PersonaConfig(output_dir="persona-output")
        if not isinstance(args, PersonaConfig):
            raise TypeError(f"PersonaTrainer needs a PersonaConfig, got {type(args).__name__}")
        if isinstance(model, (str, os.PathLike)):
            from steer.models import load_causal_lm

            model, tokenizer = load_causal_lm(model)
            processing_class = processing_class or tokenizer
        if processing_class is None:
            raise ValueError("PersonaTrainer needs processing_class= (the tokenizer)")
        adapter = args.adapter_config
        if network is None:
            persona_dim = persona_dim or _infer_persona_dim(user_vectors, train_dataset)
            # initialised from args.seed alone, not from whatever the data preparation and model loading left in
            # the global RNG: a 1-process, DDP or FSDP2 launch of the same run starts from the same network
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                network = SoftPromptNetwork(
                    persona_dim,
                    args.num_virtual_tokens,
                    args.soft_prompt_mode,
                    args.soft_prompt_hidden,
                    model_config=model.config,
                    init_std=args.soft_prompt_init_std,
                    ordinal_tilt=args.ordinal_tilt,
                )
        if network.config.ordinal_tilt != args.ordinal_tilt:
            raise UserInputError(
                f"the given SoftPromptNetwork has ordinal_tilt={network.config.ordinal_tilt} but "
                f"PersonaConfig.ordinal_tilt is {args.ordinal_tilt}"
            )
        gate = None
        if adapter is not None:
            with torch.random.fork_rng(devices=[]):  # the adapter's init from args.seed too
                torch.manual_seed(args.seed + 1)
                if not has_lm_adapter(model):
                    model = add_lm_adapter(model, adapter)
            if adapter.gate:
                names = [name for name, _ in lora_modules(model)]
                gate = PersonaGate(network.config.persona_dim, names, adapter.r).attach(model)
        elif has_lm_adapter(model):
            raise UserInputError(
                "PersonaTrainer got a model with a LoRA adapter but PersonaConfig.lm_adapter is 'none' (set "
                "lm_adapter: lora to train it, or pass the plain base model)"
            )
        self.prompt_format = args.prompt_format
        wrapped = PersonaSoftPromptModel(
            model,
            network,
            user_vectors,
            train_user_vectors=args.train_persona_vectors,
            contrast_weight=args.contrast_weight,
            contrast_scale=contrast_scale,
            train_lm_adapter=adapter is not None,
            gate=gate,
        )
        collator = data_collator or PersonaCollator(
            processing_class,
            self.prompt_format,
            max_length=args.max_length,
            answer_with_eos=args.answer_with_eos,
        )
        super().__init__(
            model=wrapped,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    @property
    def lm(self):
        """The LM (a ``PeftModel`` with ``lm_adapter: lora``), for export and inference."""
        return self.accelerator.unwrap_model(self.model).model

    @property
    def gate(self) -> PersonaGate | None:
        """The persona gate of the LM adapter (``lm_adapter_gate``), else ``None``."""
        return self.accelerator.unwrap_model(self.model).gate

    @property
    def network(self) -> SoftPromptNetwork:
        """The soft-prompt network; under FSDP2, after ``train()``, a plain gathered copy (see ``_gather_trained``)."""
        gathered = getattr(self, "_gathered", None)
        if gathered is not None:
            return gathered[0]
        return self.model.network

    # -------------------------------------------------------------- FSDP2 (see steer.trainers.sharding)
    # The frozen LM is REPLICATED on every rank (FSDP2 ``ignored_params``): it has no gradients or optimizer
    # state, and a replicated LM keeps export, evaluation and ``PersonaSteeredModel`` plain, rank-local code.
    # FSDP2 shards the trained parts only (soft-prompt network, user vectors) and reduce-scatters their
    # gradients. Outside the wrapped forward they are read through explicit gathers: checkpoints get the
    # full state dict from ``save_model``; ``train()`` ends with ``_gather_trained`` (all ranks), after
    # which ``network`` / ``user_vectors`` are plain full copies on every rank.
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        sharding.refuse_cpu_deepspeed(self.accelerator)
        if self.is_deepspeed_enabled and self.args.lm_adapter != "none":
            raise UserInputError(
                "PersonaConfig.lm_adapter: lora is not supported under DeepSpeed yet; use DDP "
                "(accelerate_configs/ddp.yaml)"
            )
        if sharding.promote_cpu_fsdp(self.accelerator):
            self.is_fsdp_enabled = True
        if not sharding.is_fsdp(self.accelerator):
            return
        if self.args.lm_adapter != "none":
            raise UserInputError(
                "PersonaConfig.lm_adapter: lora is not supported under FSDP yet (the LM is replicated outside the "
                "sharded parts, so its adapter's gradients would not be reduced); use DDP (accelerate_configs/ddp.yaml)"
            )
        sharding.require_fsdp2(self.accelerator, "PersonaTrainer")
        plugin = self.accelerator.state.fsdp_plugin
        plugin.ignored_modules = [self.model.model]  # the frozen LM stays whole on every rank
        # accelerate's rank-0-loads path (meta device + broadcast into shards) cannot hold an unsharded LM
        plugin.cpu_ram_efficient_loading = False
        # FSDP2 (unlike DDP) does not sync the initial weights: every rank starts from rank 0's network and LM
        # (with FSDP_CPU_RAM_EFFICIENT_LOADING, ranks > 0 even loaded the LM without its weights)
        sharding.broadcast_module(self.model)
        self.model.model.to(self.args.device)  # FSDP2 places what it shards, not the ignored LM

    def _gather_trained(self) -> None:
        """All ranks: full copies of the sharded network (+ trained user vectors) for code outside training."""
        module = self.accelerator.unwrap_model(self.model)
        network = SoftPromptNetwork.from_config(module.network.config)
        network.load_state_dict(sharding.full_state_dict(module.network))
        vectors = None
        if module.user_vectors is not None:
            vectors = sharding.full_tensor(module.user_vectors.weight.detach()).cpu().clone()
        self._gathered = (network.to(self.args.device).train(module.network.training), vectors)

    def train(self, *args, **kwargs):
        self._gathered = None
        result = super().train(*args, **kwargs)
        if self.is_fsdp_enabled:
            self._gather_trained()
        return result

    def _get_train_sampler(self, train_dataset=None):
        if self.args.contrast_weight > 0:
            # question blocks prepared (and shuffled, seeded) by the data step must stay together in a batch
            from torch.utils.data import SequentialSampler

            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(EXAMPLE_COLUMNS)

    def create_optimizer(self, model=None):
        """One parameter group each for the network (+ gate), the LM adapter (``lm_learning_rate``) and trained
        user vectors (``persona_learning_rate``); the Trainer's own optimizer when there is one group."""
        module = self.model
        vectors_apart = self.args.persona_learning_rate is not None and module.user_vectors is not None
        if self.optimizer is not None or (self.args.lm_adapter == "none" and not vectors_apart):
            return super().create_optimizer(model)
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, module)
        network = [p for p in module.network.parameters() if p.requires_grad]
        if module.gate is not None:
            network += list(module.gate.parameters())
        groups = [{"params": network, "weight_decay": self.args.weight_decay}]
        if self.args.lm_adapter != "none":
            adapter = [p for p in module.model.parameters() if p.requires_grad]
            groups.append(
                {"params": adapter, "weight_decay": self.args.weight_decay, "lr": self.args.lm_learning_rate}
            )
        if module.user_vectors is not None and module.user_vectors.weight.requires_grad:
            lr = self.args.persona_learning_rate or self.args.learning_rate
            groups.append({"params": [module.user_vectors.weight], "weight_decay": 0.0, "lr": lr})
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        outputs = model(**inputs)
        loss = outputs.loss
        if outputs.option_logits is not None:
            correct = (outputs.option_logits.argmax(-1) == inputs["answer_index"]).float()
            correct = self.accelerator.gather_for_metrics(correct.detach())
            self._metrics[mode]["accuracy"].append(correct.mean().item())
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Adds the averaged eval metrics (``eval_accuracy``) to the returned metrics, so that
        ``evaluate()`` returns them and ``metric_for_best_model="eval_accuracy"`` works."""
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        prefix = metric_key_prefix
        for key, values in self._metrics["eval"].items():
            if values:
                output.metrics[f"{prefix}_{key}"] = sum(values) / len(values)
        self._metrics["eval"].clear()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()

    # -------------------------------------------------------------- checkpoints: only the trained weights
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        # FSDP2: every rank gathers the trained parts (not the frozen LM); rank 0 writes them in _save
        module = self.accelerator.unwrap_model(self.model)
        state = {f"network.{k}": v for k, v in sharding.full_state_dict(module.network).items()}
        if module.user_vectors is not None:
            state["user_vectors.weight"] = sharding.full_state_dict(module.user_vectors)["weight"]
        self._save(output_dir, state_dict=state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model)
        network, vectors = module.network, module.user_vectors
        if self.is_fsdp_enabled:  # FSDP2: sharded parameters; save_model gathered their full values
            if state_dict is None:
                raise ValueError(
                    "PersonaTrainer._save under FSDP needs the gathered state_dict (use save_model)"
                )
            network = SoftPromptNetwork.from_config(module.network.config)
            prefix = "network."
            network.load_state_dict(
                {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            )
            if vectors is not None:
                vectors = nn.Embedding.from_pretrained(
                    state_dict["user_vectors.weight"].detach().cpu().clone()
                )
                vectors.weight.requires_grad_(module.user_vectors.weight.requires_grad)
        network.save_pretrained(directory)
        if self.args.lm_adapter != "none":
            save_lm_adapter(module.model, module.gate, directory / ADAPTER_DIR)
        else:
            shutil.rmtree(directory / ADAPTER_DIR, ignore_errors=True)
        atomic_write_json(directory / FORMAT_NAME, self.prompt_format.to_dict())
        if vectors is not None and vectors.weight.requires_grad:
            atomic_save_file({"user_vectors": vectors.weight}, directory / USER_VECTORS_NAME)
        torch.save(self.args, directory / "training_args.bin")

    def _load_trained_weights(self, checkpoint: str | os.PathLike) -> None:
        directory = Path(checkpoint)
        module = self.accelerator.unwrap_model(self.model)
        loaded = SoftPromptNetwork.from_pretrained(directory)
        if loaded.config != module.network.config:
            raise ValueError(
                f"checkpoint {directory} holds a soft-prompt network {loaded.config} that does not match the "
                f"trainer's {module.network.config}"
            )
        # load_full_state_dict: plain parameters take the values, FSDP2-sharded ones their own slice
        sharding.load_full_state_dict(module.network, loaded.state_dict())
        if self.args.lm_adapter != "none":
            load_adapter_weights(module.model, module.gate, directory / ADAPTER_DIR)
        vectors = directory / USER_VECTORS_NAME
        if vectors.is_file() and module.user_vectors is not None:
            weight = load_file(str(vectors))["user_vectors"]
            if weight.shape != module.user_vectors.weight.shape:
                raise ValueError(
                    f"{vectors}: shape {tuple(weight.shape)} != {tuple(module.user_vectors.weight.shape)}"
                )
            sharding.load_full_state_dict(module.user_vectors, {"weight": weight})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_trained_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("Loading best soft-prompt network from %s", self.state.best_model_checkpoint)
        self._load_trained_weights(self.state.best_model_checkpoint)

    @property
    def user_vectors(self) -> torch.Tensor | None:
        gathered = getattr(self, "_gathered", None)
        if gathered is not None:  # FSDP2, after train(): the gathered full table
            return gathered[1]
        module = self.accelerator.unwrap_model(self.model)
        return None if module.user_vectors is None else module.user_vectors.weight.detach().cpu()


def _infer_persona_dim(user_vectors, dataset) -> int:
    if user_vectors is not None:
        return int(torch.as_tensor(user_vectors).shape[1])
    if dataset is not None and len(dataset) > 0:
        first = dataset[0]
        if first.get("persona") is not None:
            return len(first["persona"])
    raise ValueError("cannot infer persona_dim: pass persona_dim=, user_vectors= or examples with 'persona'")


def load_user_vectors(checkpoint: str | os.PathLike) -> torch.Tensor | None:
    """The fine-tuned user vectors of a checkpoint (``None`` when they were not trained)."""
    path = Path(checkpoint) / USER_VECTORS_NAME
    return load_file(str(path))["user_vectors"] if path.is_file() else None
