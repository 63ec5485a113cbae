"""Text conditioning as the checkpoints expect it: a frozen CLIP text tower's `last_hidden_state`
(after the final LayerNorm), all 77 tokens, padded with <|endoftext|>, the attention mask passed.

Stage C takes CLIP-bigG (width 1280), Stage B CLIP-ViT-H (width 1024). Two backends give the same
output contract: transformers' CLIPTextModel (the diffusers layout) and open_clip text towers.
"""

import gzip
import json
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
# The hub checkpoints each stage was trained with (diffusers' conversion script).
STAGE_C_TEXT_ENCODER = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
STAGE_B_TEXT_ENCODER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# A prompt every CLIP BPE tokenizer round-trips; a broken tokenizer (e.g. an offline hub load that
# silently fell back to an empty vocabulary) does not.
_PROBE_PROMPT = "a photo of a red apple on a wooden table"
_MIN_VOCAB = 1000


class TokenizerError(ValueError):
    """A tokenizer that cannot produce the tokens the text encoder was trained on."""


def check_tokenizer(tokenizer, source: str) -> None:
    """Refuses a tokenizer with a degenerate vocabulary or one that does not round-trip a known prompt."""
    size = len(tokenizer)
    if size < _MIN_VOCAB:
        raise TokenizerError(
            f"the tokenizer from {source} has {size} tokens (a CLIP tokenizer has 49408); it was probably "
            f"loaded offline without its vocabulary files. Pass a folder that holds vocab.json and merges.txt "
            f"(or tokenizer.json)."
        )
    ids = tokenizer(_PROBE_PROMPT).input_ids
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    if len(set(ids)) < 4 or text != _PROBE_PROMPT:
        raise TokenizerError(
            f"the tokenizer from {source} does not round-trip {_PROBE_PROMPT!r} (got {text!r} from ids {ids[:12]}); "
            f"it is not a working CLIP tokenizer"
        )


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """Writes vocab.json and merges.txt of the CLIP BPE vocabulary that ships with open_clip.

    It is the vocabulary of OpenAI's and LAION's CLIP models, so tests and offline machines get the
    real tokenizer without a download.
    """
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_clip_tokenizer(path_or_hub_id: str | Path, subfolder: str | None = None):
    """A CLIPTokenizer from a folder or hub id, checked for sanity and padding with <|endoftext|>."""
    from transformers import CLIPTokenizer

    kwargs = {"subfolder": subfolder} if subfolder else {}
    source = f"{path_or_hub_id}" + (f" ({subfolder}/)" if subfolder else "")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path_or_hub_id), **kwargs)
    except Exception as err:
        raise TokenizerError(f"could not load a CLIP tokenizer from {source}: {type(err).__name__}: {err}") from err
    check_tokenizer(tokenizer, source)
    if tokenizer.pad_token != tokenizer.eos_token:
        log.warning("tokenizer from %s pads with %r; the checkpoints expect %r", source, tokenizer.pad_token, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_subfolder(path_or_hub_id: str | Path, subfolder: str, marker: str) -> bool:
    """Whether a pipeline folder or hub repository (like warp-ai/wuerstchen) keeps a component in
    `subfolder`, i.e. holds `subfolder/marker`: looked up on disk for a local folder, and through
    huggingface_hub for a hub id (from its local cache when offline), as the loaders will fetch it."""
    from stages.diffusers_format import looks_like_hub_id

    name = str(path_or_hub_id)
    local = Path(name).expanduser()
    if local.exists():
        return (local / subfolder / marker).is_file()
    if not looks_like_hub_id(name):
        return False
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name, marker, subfolder=subfolder)
    except Exception:  # not in the repository, or the hub cannot be asked: the loader then says why it fails
        return False
    return True


class ClipTextEncoder(nn.Module):
    """Tokenizer + frozen CLIP text tower: prompts -> (B, 77, width) hidden states after the final LN."""

    def __init__(self, tokenizer, model: nn.Module, backend: str = "transformers"):
        super().__init__()
        if backend not in ("transformers", "open_clip"):
            raise ValueError(f"unknown text encoder backend {backend!r}; use 'transformers' or 'open_clip'")
        self.tokenizer = tokenizer
        self.model = model
        self.backend = backend
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        if self.backend == "transformers":
            return self.model.config.hidden_size
        return self.model.transformer.width

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True):
        # Frozen in every recipe: dropout must never switch on inside a training step.
        return super().train(False)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        text_encoder_subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "ClipTextEncoder":
        """A transformers CLIPTextModel + CLIPTokenizer: a model folder, a pipeline folder with
        text_encoder/ and tokenizer/ subfolders, or a hub id (e.g. STAGE_C_TEXT_ENCODER)."""
        from transformers import CLIPTextModel

        if text_encoder_subfolder is None and _has_subfolder(path_or_hub_id, "text_encoder", "config.json"):
            text_encoder_subfolder = "text_encoder"
        if tokenizer_subfolder is None and _has_subfolder(path_or_hub_id, "tokenizer", "tokenizer_config.json"):
            tokenizer_subfolder = "tokenizer"
        tokenizer = load_clip_tokenizer(path_or_hub_id, tokenizer_subfolder)
        kwargs = {"subfolder": text_encoder_subfolder} if text_encoder_subfolder else {}
        try:
            model = CLIPTextModel.from_pretrained(str(path_or_hub_id), dtype=dtype, **kwargs)
        except Exception as err:
            raise FileNotFoundError(
                f"could not load a CLIPTextModel from {path_or_hub_id} ({type(err).__name__}: {err}). Without "
                f"network access, download it elsewhere and pass the local folder."
            ) from err
        return cls(tokenizer, model, "transformers")

    @classmethod
    def tiny(cls, width: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> "ClipTextEncoder":
        """A randomly initialised CLIP text tower of the given width with the real CLIP tokenizer,
        for tests and CPU demos (no download)."""
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp))
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=width * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=CONTEXT_LENGTH,
            hidden_act="gelu",
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPTextModel(config)
        return cls(tokenizer, model, "transformers")

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None = None, dtype: torch.dtype = torch.float32):
        """An open_clip text tower (e.g. "ViT-bigG-14" with pretrained "laion2b_s39b_b160k" or a local
        weights file), tokenised with the same CLIP BPE and <|endoftext|> padding."""
        import open_clip

        model = open_clip.create_model(model_name, pretrained=pretrained, precision="fp32")
        return cls.from_open_clip_tower(model, dtype)

    @classmethod
    def from_open_clip_tower(cls, model: nn.Module, dtype: torch.dtype = torch.float32) -> "ClipTextEncoder":
        """Wraps the text part of an open_clip CLIP / CustomTextCLIP model or a TextTransformer."""
        from transformers import CLIPTokenizer

        tower = getattr(model, "text", model)
        text = _OpenClipText(tower).to(dtype)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp))
        return cls(tokenizer, text, "open_clip")

    # -- encoding -----------------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (B, 77): truncated, padded with <|endoftext|>."""
        if isinstance(prompts, str):
            raise TypeError("tokenize takes a list of prompts, not a single string")
        enc = self.tokenizer(
            list(prompts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
        )
        return enc.input_ids, enc.attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if self.backend == "transformers":
            return self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        return self.model(input_ids, attention_mask)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self(*self.tokenize(prompts))

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes text_encoder/ and tokenizer/ under `directory` (transformers backend only)."""
        if self.backend != "transformers":
            raise ValueError("only a transformers CLIPTextModel can be saved in the diffusers layout")
        directory = Path(directory)
        self.model.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")


class _OpenClipText(nn.Module):
    """An open_clip text tower's token outputs with the same padding mask transformers' CLIP applies."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.heads = self.transformer.resblocks[0].attn.num_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, length = input_ids.shape
        dtype = self.positional_embedding.dtype
        x = self.token_embedding(input_ids).to(dtype) + self.positional_embedding[:length].to(dtype)
        causal = torch.full((length, length), float("-inf"), device=x.device).triu_(1)
        padding = torch.zeros(b, 1, length, device=x.device).masked_fill_(attention_mask[:, None, :] == 0, float("-inf"))
        mask = (causal[None] + padding).repeat_interleave(self.heads, 0).to(dtype)
        return self.ln_final(self.transformer(x, attn_mask=mask))
