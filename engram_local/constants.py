"""Every GGUF key, tensor name and file-format constant of engram-local, defined once.

Files engram-local writes:
  * Engram sidecar GGUF (`engram.gguf`): memory tables, projections, hash constants.
  * User override file (`*.eov`): a GGUF container of replacement rows plus a fact ledger.
Keys are namespaced `engram.*` / `eov.*`; tensor names stay under 64 bytes (ggml's limit).
"""

from pathlib import Path

# --------------------------------------------------------------------------- shipped data
# Files that ship inside the package (engram_local/data, engram_local/texts).
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT_DIR = PACKAGE_DIR / "data" / "default-engram"   # the default model's Engram + adapter
SKILL_USERS_DIR = PACKAGE_DIR / "data" / "skill-users"              # the skill adapter's training users
UNRELATED_TEXT = PACKAGE_DIR / "texts" / "unrelated-austen.txt"     # locality text of the evaluation

# --------------------------------------------------------------------------- ggml types
# ggml type ids as in gguf.GGMLQuantizationType (the native kernel uses the same numbers).
QTYPE_F32 = 0
QTYPE_F16 = 1
QTYPE_Q4_0 = 2
QTYPE_Q8_0 = 8
QTYPE_BF16 = 30
TABLE_QTYPES = {"f32": QTYPE_F32, "f16": QTYPE_F16, "bf16": QTYPE_BF16,
                "q8_0": QTYPE_Q8_0, "q4_0": QTYPE_Q4_0}
OVERRIDE_QTYPES = {"f32": QTYPE_F32, "f16": QTYPE_F16}

# Key value meaning "this override row applies to every look-up of its row".
ANY_KEY = -1

# --------------------------------------------------------------------------- Engram sidecar
SIDECAR_ARCH = "engram"
SIDECAR_FORMAT_VERSION = 1
KEY_FORMAT_VERSION = "engram.format_version"
KEY_FINGERPRINT = "engram.fingerprint"          # uint64 xxh3_64 over hash config + table bytes
KEY_LAYER_IDS = "engram.layer_ids"              # int32 array, decoder layers with an Engram
KEY_WRITE_LAYER = "engram.write_layer"          # int32, the layer user facts are written into
KEY_MAX_NGRAM = "engram.max_ngram_size"         # uint32 N
KEY_N_HEAD = "engram.n_head_per_ngram"          # uint32 K
KEY_HEAD_DIM = "engram.head_dim"                # uint32 d_head
KEY_VOCAB_PER_NGRAM = "engram.vocab_size_per_ngram"  # int32 array, per order
KEY_COMPRESSED_VOCAB = "engram.compressed_vocab_size"
KEY_PAD_ID = "engram.pad_id"                    # canonical pad id
KEY_SEED = "engram.seed"
KEY_KERNEL_SIZE = "engram.conv_kernel_size"
KEY_HIDDEN = "engram.hidden_size"               # backbone width the Engram writes into
KEY_BACKBONE_ARCH = "engram.backbone_arch"
KEY_INTEGRITY = "engram.integrity"              # uint64 xxh3_64 of the header (fingerprint and integrity
                                                # values zeroed) and every tensor but the tables; files
                                                # converted before it existed carry none (still read)

TENSOR_CANONICAL_MAP = "engram.canonical_map"   # I64 [raw_vocab]
# Per-layer tensors; format with layer id.
TENSOR_TABLE = "engram.{layer}.table"           # [rows, head_dim]
TENSOR_MULTIPLIERS = "engram.{layer}.multipliers"  # I64 [N]
TENSOR_PRIMES = "engram.{layer}.primes"         # I64 [(N-1)*K]
TENSOR_OFFSETS = "engram.{layer}.offsets"       # I64 [(N-1)*K]
TENSOR_W_K = "engram.{layer}.w_k"               # [hidden, (N-1)*K*d_head]
TENSOR_W_V = "engram.{layer}.w_v"
TENSOR_CONV = "engram.{layer}.conv"             # [hidden, kernel]
TENSOR_NORM_Q = "engram.{layer}.norm_q"         # F32 [hidden]: RMSNorm scale on the hidden state
TENSOR_NORM_K = "engram.{layer}.norm_k"         # F32 [hidden]: RMSNorm scale on the key
TENSOR_NORM_V = "engram.{layer}.norm_v"         # F32 [hidden]: RMSNorm scale before the conv
KEY_NORM_EPS = "engram.norm_eps"                # float64, RMSNorm epsilon inside the Engram
KEY_SOURCE_DIGEST = "engram.source_digest"      # string: xxh3_64 of the checkpoint it came from
# Fingerprint stream header: magic + version of the fingerprint definition (docs/convert.md).
FINGERPRINT_MAGIC = b"ENGRAMFP"
FINGERPRINT_VERSION = 1
# Sidecar tensor data alignment: page-aligned tables give exact madvise ranges.
SIDECAR_ALIGNMENT = 4096

# --------------------------------------------------------------------------- MODEL_DIR
# `engram-local convert` output: file names inside a model directory.
MODEL_DIR_BACKBONE = "backbone.gguf"            # stock llama.cpp architecture + tokenizer
MODEL_DIR_ENGRAM = "engram.gguf"                # Engram sidecar
MODEL_DIR_ADAPTER = "adapter.gguf"              # skill adapter (llama.cpp LoRA), optional
MODEL_DIR_SKILL_BACKBONE = "backbone-skill.gguf"  # the backbone with the adapter folded in: the skill-on
                                                # model of every backend and consumer
MODEL_DIR_LAYOUT_VERSION = 4                    # what a MODEL_DIR holds (2: + backbone-skill.gguf;
                                                # 3: its folded q/k/v stored as Q5_1, not Q8_0;
                                                # 4: engram.gguf carries KEY_INTEGRITY);
                                                # part of the default model's digest: a change rebuilds it
# Engram checkpoint directory: the skill adapter, when present, as a PEFT LoRA directory.
CHECKPOINT_ADAPTER_DIR = "adapter"
DEFAULT_TABLE_TYPE = "f16"                      # `convert --table-type` default
DEFAULT_OUTTYPE = "f16"                         # `convert --outtype` default (HF backbones)
BACKBONE_OUTTYPES = ("f32", "f16", "q8_0")
# The default MODEL_DIR stores the shipped SmolLM2 Q4_1 matrices as F16: llama.cpp then rounds a
# matmul's input to F16 instead of 8 bits per block, and the llama.cpp and torch backends (and the
# memory writer) compute one function - 97-99.5 % of greedy tokens agree instead of 69-74 %, at
# 0.81x the Q4_1 decode speed (docs/agreement.md, docs/benchmarks.md). Part of the default
# model's digest.
DEFAULT_MODEL_OUTTYPE = "f16"

# --------------------------------------------------------------------------- LoRA adapter
# llama.cpp's adapter keys (src/llama-adapter.cpp); general.architecture = the base model's.
ADAPTER_GENERAL_TYPE = "adapter"                # value of general.type
KEY_ADAPTER_TYPE = "adapter.type"
ADAPTER_TYPE_LORA = "lora"
KEY_ADAPTER_LORA_ALPHA = "adapter.lora.alpha"   # float32
# The chat replies `remember` fits each fact in for this adapter (memory.facade.fact_inputs): a
# string array of CHAT_FORM_NAMES, set by train-skill from its recipe; absent = ("recite",).
KEY_ADAPTER_CHAT_FORMS = "engram_local.chat_forms"
CHAT_FORM_NAMES = ("recite", "echo")
TENSOR_LORA_A = "{base}.lora_a"                 # [r, in] (numpy), base = backbone tensor name
TENSOR_LORA_B = "{base}.lora_b"                 # [out, r]

# --------------------------------------------------------------------------- override files
EOV_ARCH = "engram-overrides"
EOV_FORMAT_VERSION = 1                          # the first format (no checksum): still read; the
                                                # next write upgrades the file to EOV_WRITE_VERSION
EOV_WRITE_VERSION = 2                           # what every write produces (2: + KEY_EOV_CHECKSUM)
EOV_READ_VERSIONS = (EOV_FORMAT_VERSION, EOV_WRITE_VERSION)
KEY_EOV_VERSION = "eov.format_version"
KEY_EOV_CHECKSUM = "eov.checksum"               # uint64 xxh3_64 of the whole file with these 8 bytes
                                                # zeroed (version 2)
KEY_EOV_FINGERPRINT = "eov.model_fingerprint"   # uint64, the sidecar fingerprint it binds to
KEY_EOV_LAYERS = "eov.layers"                   # int32 array of layer ids written
KEY_EOV_LEDGER = "eov.ledger"                   # JSON string: the fact ledger
TENSOR_EOV_ROWS = "eov.{layer}.rows"            # I64 [n] ascending by (row, key)
TENSOR_EOV_KEYS = "eov.{layer}.keys"            # I64 [n], -1 = any look-up
TENSOR_EOV_VALUES = "eov.{layer}.values"        # F16/F32 [n, head_dim]
