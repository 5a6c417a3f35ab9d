"""Structured outputs: a request's output held to a JSON schema, a regex, a choice or a grammar.

``params.StructuredOutputsParams`` is what a request sets (``SamplingParams.structured_outputs``, vLLM's
shape); ``manager.StructuredOutputManager`` compiles it off the engine's step (cached) and makes one
matcher per sample; ``backend`` wraps the grammar engine (xgrammar), imported only when a structured
request arrives. The sampler applies each step's matchers as a per-row token mask
(``manager.allowed_token_mask``); the engine advances a sample's matcher with each token it keeps and
ends the sample when its grammar has terminated.
"""
