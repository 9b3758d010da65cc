"""The denoising loops by name: a family's ``pipeline`` (wan/families) -> the class that runs it. A new
loop is a module beside these and one entry in ``PIPELINES``."""
from pipeline.causal_inference import CausalInferencePipeline
from pipeline.rolling_inference import RollingInferencePipeline
from wan import families

PIPELINES = {"block_wise": CausalInferencePipeline, "rolling": RollingInferencePipeline}


def pipeline_class(config):
    """The pipeline class of a checked config's model family."""
    family, _ = families.family_and_variant(config)
    return PIPELINES[family.pipeline]
