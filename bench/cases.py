"""What a runtime case is, and the columns of the runtime tables: shared by the runtime
report's arithmetic (bench.runtime_report), its plots (bench.plots) and its Markdown
(bench.markdown)."""

# (PT-DiT model, its baseline, why the pair)
PAIRS = (("PT-DiT/XL", "PixArt-XL/2", "matched width and depth"),
         ("PT-DiT/L", "PixArt-XL/2", "the paper's pair (0.6B each)"),
         ("PT-DiT/B", "DiT-B/2", "the paper's pair (0.14B vs 0.13B)"),
         ("PT-DiT/XL", "DiT-XL/2", "matched width and depth, class-conditioned base"))
# the issue's target: PT-DiT/XL's achieved TFLOP/s at 2048 px at least 80% of PixArt-XL/2's
TARGET = ("PT-DiT/XL", "PixArt-XL/2", 2048, 0.8)

SETUP = ("device", "dtype", "mode")              # one Markdown table per setup
EXTRAS = ("backend", "compile", "cuda_graphs", "overrides")   # the rest of a case's setup
SHAPE = ("resolution", "latent_frames", "batch")
CASE = SETUP + EXTRAS + SHAPE
VARIANT = ("text_tokens", "window")              # model inputs that may differ within a case
SERIES = EXTRAS + ("batch",) + VARIANT           # what splits a plot's model into lines
PROVENANCE = ("host", "torch", "git_sha", "time_utc")
LATENCY = ("latency_ms_median", "latency_ms_iqr", "latency_ms_min", "n", "warmup", "compile_s",
           "total_gmacs", "achieved_tflops")
MEMORY = ("memory_method", "peak_mib", "reserved_mib", "baseline_mib", "predicted_activation_mib",
          "measured_over_predicted")
KEY = ("model",) + CASE + VARIANT + ("tokens", "forward_batch", "threads")
COLUMNS = ("measurement", "status") + KEY + PROVENANCE + LATENCY + MEMORY
PROFILE_CATEGORIES = ("gemm", "attention", "layout", "norm", "elementwise", "optimizer", "other",
                      "untraced")   # bench.profile.CATEGORIES
PROFILE_COLUMNS = ("model", *CASE, *VARIANT, "tokens", "threads", "step_ms",
                   *[f"{c}_share" for c in PROFILE_CATEGORIES], "gemm_tflops",
                   "attention_tflops")
MEASUREMENTS = ("latency", "memory", "profile")   # bench.sweep.MEASUREMENTS
NO_SAVING = "no saving predicted"
NO_MACS = "no total_gmacs in a row"
