"""The SGLang release this adapter is written against, and every part of it the adapter relies on.

`tests/test_sglang_conformance.py` downloads exactly this wheel and checks each entry statically
(ast; nothing from sglang is imported), so an SGLang upgrade is one version bump plus a red or green
test, not a surprise on a GPU box.
"""

VERSION = "0.5.23"
WHEEL = f"sglang=={VERSION}"

# HTTP routes (srt/entrypoints/http_server.py): path -> (method, request model).
ROUTES = {
    "/generate": ("POST", "GenerateReqInput"),
    "/begin_weight_update": ("POST", "BeginWeightUpdateReqInput"),
    "/update_weights_from_tensor": ("POST", "UpdateWeightsFromTensorReqInput"),
    "/end_weight_update": ("POST", "EndWeightUpdateReqInput"),
    "/pause_generation": ("POST", "PauseGenerationReqInput"),
    "/continue_generation": ("POST", "ContinueGenerationReqInput"),
    "/health": ("GET", None),
}

# Fields we send or read, per class: class -> (file, fields).
FIELDS = {
    "BeginWeightUpdateReqInput": ("srt/managers/io_struct.py", ("selector",)),
    "UpdateWeightsFromTensorReqInput": ("srt/managers/io_struct.py", (
        "serialized_named_tensors", "load_format", "flush_cache", "weight_version", "selector")),
    "EndWeightUpdateReqInput": ("srt/managers/io_struct.py", ()),
    "PauseGenerationReqInput": ("srt/managers/io_struct.py", ("mode",)),
    "ContinueGenerationReqInput": ("srt/managers/io_struct.py", ()),
    "GenerateReqInput": ("srt/managers/io_struct.py", (
        "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
        "top_logprobs_num", "return_hidden_states")),
    "SamplingParams": ("srt/sampling/sampling_params.py", (
        "max_new_tokens", "temperature", "stop_token_ids", "sampling_seed")),
    # what the scheduler plugin reads in eagle_sample's arguments
    "EagleVerifyInput": ("srt/speculative/eagle_info.py", (
        "draft_token", "retrieve_next_token", "retrieve_next_sibling", "draft_token_num")),
    "ScheduleBatch": ("srt/managers/schedule_batch.py", ("reqs", "seq_lens", "seq_lens_cpu", "forward_mode")),
    "LogitsProcessorOutput": ("srt/layers/logits_processor.py", ("next_token_logits",)),
}

# SGLang's allow-list unpickler for weight payloads (utils/common.py, SafeUnpickler.ALLOWED_GLOBALS):
# the entries our by-value payloads (CPU) and torch's CUDA/shared-memory reductions use. The test fake
# unpickles with exactly these, in a separate process, as SGLang's scheduler does; torch.storage.
# _load_from_bytes is not in the list: SafeUnpickler.find_class maps it to a weights_only torch.load.
UNPICKLE_ALLOWED = (
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch", "Tensor"), ("torch", "Size"), ("torch", "bfloat16"), ("torch", "float32"), ("torch", "float16"),
    ("torch", "int64"),
    ("torch.storage", "UntypedStorage"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.multiprocessing.reductions", "rebuild_storage_fd"),
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("multiprocessing.resource_sharer", "DupFd"),
)

# Literal values we pass for typed fields.
SELECTOR_VALUES = ("draft",)
PAUSE_MODE = "in_place"  # PauseGenerationReqInput.mode: requests stay resident with their KV cache

# Launch flags (`python -m sglang.launch_server --flag-name`): server-arg field -> file declaring it.
SERVER_ARGS = {
    "model_path": "srt/arg_groups/fields/model.py",
    "tp_size": "srt/arg_groups/fields/parallel.py",
    "host": "srt/arg_groups/fields/serving.py",
    "port": "srt/arg_groups/fields/serving.py",
    "api_key": "srt/arg_groups/fields/serving.py",
    "admin_api_key": "srt/arg_groups/fields/serving.py",
    "weight_version": "srt/arg_groups/fields/serving.py",
    "speculative_algorithm": "srt/arg_groups/fields/spec.py",
    "speculative_draft_model_path": "srt/arg_groups/fields/spec.py",
    "speculative_num_steps": "srt/arg_groups/fields/spec.py",
    "speculative_eagle_topk": "srt/arg_groups/fields/spec.py",
    "speculative_num_draft_tokens": "srt/arg_groups/fields/spec.py",
    "enable_return_aux_hidden_states": "srt/arg_groups/fields/exec_.py",
    "enable_return_hidden_states": "srt/arg_groups/fields/exec_.py",
    "disable_radix_cache": "srt/arg_groups/fields/memory.py",
    "mem_fraction_static": "srt/arg_groups/fields/schedule.py",
    "chunked_prefill_size": "srt/arg_groups/fields/schedule.py",
}
LAUNCH_MODULE = "launch_server.py"

# Functions and methods (file under sglang/, qualified name, parameters it must accept).
SYMBOLS = (
    ("srt/utils/common.py", "MultiprocessingSerializer.deserialize", ("data",)),
    ("srt/managers/tp_worker.py", "BaseTpWorker.deserialize_own_rank", ("serialized_named_tensors",)),
    ("srt/managers/scheduler_components/weight_updater.py", "SchedulerWeightUpdaterManager.begin_weight_update",
     ("recv_req",)),
    ("srt/managers/scheduler_components/weight_updater.py",
     "SchedulerWeightUpdaterManager.flush_cache_after_weight_update", ("recv_req", "success", "message")),
    ("srt/models/llama_eagle3.py", "LlamaForCausalLMEagle3.load_weights", ("weights",)),
    # the plugin: SGLang's plugin loader and hook registry, and the hooked function
    ("srt/plugins/__init__.py", "load_plugins", ()),
    ("srt/plugins/hook_registry.py", "HookRegistry.register", ("target", "hook", "hook_type")),
    ("srt/speculative/eagle_utils.py", "eagle_sample", ("verify_input", "batch", "logits_output")),
    ("srt/runtime_context.py", "get_parallel", ()),
)

# Source facts the adapter's behaviour depends on: (file, function or "" for the whole module, a string
# its source contains, as `ast.unparse` prints it: single quotes, normalised spacing).
SOURCE_FACTS = (
    # d2t is turned into hot_token_id at load, so a swap must never resend it.
    ("srt/models/llama_eagle3.py", "LlamaForCausalLMEagle3.load_weights", "hot_token_id"),
    # checkpoints keep the legacy `midlayer.` prefix; SGLang renames it.
    ("srt/models/llama_eagle3.py", "LlamaForCausalLMEagle3.load_weights", "midlayer"),
    # each TP rank deserializes only its own payload: one payload per rank.
    ("srt/managers/tp_worker.py", "BaseTpWorker.deserialize_own_rank", "tp_rank"),
    # the plugin entry-point group and the hook target's module binding
    ("srt/plugins/__init__.py", "", "GENERAL_PLUGINS_GROUP = 'sglang.srt.plugins'"),
    ("srt/speculative/eagle_worker_common.py", "", "eagle_prepare_for_verify, eagle_sample"),
    ("srt/speculative/eagle_worker_common.py", "run_eagle_verify", "eagle_sample("),
    ("srt/speculative/eagle_utils.py", "eagle_sample", "return (predict, accept_lens, accept_index)"),
    # accept_index starts with the root's block index (what StepRecord.accepted assumes)
    ("kernels/ops/speculative/spec_tree.py", "verify_tree_greedy_kernel_triton",
     "tl.store(accept_index_ptr + bx * num_speculative_tokens, last_accept_retrieve_idx)"),
    # the draft layer takes RoPE from config.json (rope_parameters or rope_theta + rope_scaling), and
    # llama3 scaling is one SGLang computes: our exported config is what it runs (bridge.eagle3.RopeScaling)
    ("srt/models/llama.py", "LlamaDecoderLayer.__init__", "rope_scaling = getattr(config, 'rope_scaling', None)"),
    ("srt/layers/rotary_embedding/factory.py", "get_rope", "if scaling_type == 'llama3':"),
    # response shapes the sidecar converts
    ("srt/managers/tokenizer_manager.py", "", "meta_info['hidden_states'] = hidden_states"),
    ("srt/managers/tokenizer_manager.py", "", "'weight_version': self.config_value('weight_version')"),
    ("srt/managers/scheduler_components/batch_result_processor.py", "", "req.hidden_states.extend("),
    ("srt/managers/schedule_batch.py", "FINISH_LENGTH.to_json", "'type': 'length'"),
    # output logprobs are divided by the temperature unless this env var is set (the launcher sets it;
    # greedy batches are exempt): traces must hold the raw distribution
    ("srt/environ.py", "", "SGLANG_RETURN_ORIGINAL_LOGPROB = EnvBool(False)"),
    ("srt/layers/sampler.py", "Sampler.forward", "log_softmax(logprob_logits / sampling_info.temperatures"),
    ("srt/layers/logprob_processor.py", "", "envs.SGLANG_RETURN_ORIGINAL_LOGPROB.get()"),
    # every /generate holds the model-update reader lock for its life; weight-update calls take the
    # writer lock unless generation is paused (why the updater swaps inside a pause)
    ("srt/managers/tokenizer_manager.py", "TokenizerManager.generate_request",
     "async with self.model_update_lock.reader_lock:"),
    ("srt/managers/tokenizer_control_mixin.py", "TokenizerControlMixin._weight_update_session_call",
     "async with self.model_update_lock.writer_lock:"),
    ("srt/managers/tokenizer_control_mixin.py", "TokenizerControlMixin._weight_update_session_call",
     "if is_paused:"),
    ("srt/entrypoints/http_server.py", "pause_generation", "'status': 'ok'"),
    ("srt/entrypoints/http_server.py", "continue_generation", "'status': 'ok'"),
    ("srt/utils/weight_versions.py", "add_weight_versions_to_meta_info", "meta_info['weight_versions']"),
    # chunked prefill: only the chunk that completes the prompt stores its hidden-state rows
    ("srt/managers/scheduler_components/batch_result_processor.py",
     "SchedulerBatchResultProcessor.process_batch_result_prefill", "(req.inflight_middle_chunks <= 0)"),
    ("srt/managers/scheduler_components/batch_result_processor.py",
     "SchedulerBatchResultProcessor.process_batch_result_prefill", "store=should_commit_output"),
    # the draft's vocabulary map is read once (hot_token_id) and its embedding is the target's tensor
    ("srt/speculative/eagle_worker_v2.py", "EagleDraftWorker.init_lm_head",
     "self.hot_token_id = self.draft_runner.model.hot_token_id.to(embed.device)"),
    ("srt/speculative/eagle_worker_v2.py", "EagleDraftWorker.init_lm_head", "self.draft_runner.model.set_embed(embed)"),
    # payloads: CUDA devices named by UUID are mapped to the local index; _load_from_bytes is allowed
    ("srt/utils/patch_torch.py", "_device_from_maybe_uuid", "get_device_properties(device).uuid) == device_maybe_uuid"),
    ("srt/utils/patch_torch.py", "", "_REDUCE_TENSOR_ARG_DEVICE_INDEX = 6"),
    ("srt/utils/common.py", "SafeUnpickler.find_class", "('torch.storage', '_load_from_bytes')"),
)
