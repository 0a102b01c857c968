"""The SGLang release this adapter is written against, and every part of it the adapter relies on.

`tests/test_sglang_conformance.py` downloads exactly this wheel and checks each entry statically
(ast; nothing from sglang is imported), so an SGLang upgrade is one version bump plus a red or green
test, not a surprise on a GPU box.
"""

VERSION = "0.5.23"
WHEEL = f"sglang=={VERSION}"

# HTTP routes (sglang/srt/entrypoints/http_server.py): method, path, request model.
ROUTES = {
    "/generate": ("POST", "GenerateReqInput"),
    "/begin_weight_update": ("POST", "BeginWeightUpdateReqInput"),
    "/update_weights_from_tensor": ("POST", "UpdateWeightsFromTensorReqInput"),
    "/end_weight_update": ("POST", "EndWeightUpdateReqInput"),
    "/get_server_info": ("GET", None),
    "/health": ("GET", None),
}

# Request fields we send (sglang/srt/managers/io_struct.py), per request class.
REQUEST_FIELDS = {
    "BeginWeightUpdateReqInput": ("selector",),
    "UpdateWeightsFromTensorReqInput": ("serialized_named_tensors", "load_format", "flush_cache",
                                        "weight_version", "selector"),
    "EndWeightUpdateReqInput": (),
    "GenerateReqInput": ("text", "input_ids", "sampling_params", "return_logprob", "top_logprobs_num",
                         "return_hidden_states", "stream", "rid"),
}

# Literal values we pass for typed fields.
SELECTOR_VALUES = ("draft",)

# Functions and methods (file under sglang/, qualified name, parameters it must accept).
SYMBOLS = (
    ("srt/utils/common.py", "MultiprocessingSerializer.deserialize", ("data",)),
    ("srt/managers/tp_worker.py", "BaseTpWorker.deserialize_own_rank", ("serialized_named_tensors",)),
    ("srt/managers/scheduler_components/weight_updater.py", "SchedulerWeightUpdaterManager.begin_weight_update",
     ("recv_req",)),
    ("srt/managers/scheduler_components/weight_updater.py", "SchedulerWeightUpdaterManager.flush_cache_after_weight_update",
     ("recv_req", "success", "message")),
    ("srt/models/llama_eagle3.py", "LlamaForCausalLMEagle3.load_weights", ("weights",)),
)

# Source facts the adapter's behaviour depends on: (file, function, a string its body must contain).
SOURCE_FACTS = (
    # d2t is turned into hot_token_id at load, so a swap must never resend it.
    ("srt/models/llama_eagle3.py", "LlamaForCausalLMEagle3.load_weights", "hot_token_id"),
    # checkpoints keep the legacy `midlayer.` prefix; SGLang renames it.
    ("srt/models/llama_eagle3.py", "LlamaForCausalLMEagle3.load_weights", "midlayer"),
    # each TP rank deserializes only its own payload: one payload per rank.
    ("srt/managers/tp_worker.py", "BaseTpWorker.deserialize_own_rank", "tp_rank"),
)
