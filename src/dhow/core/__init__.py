"""The shared vocabulary: tensors, requests, responses, datatypes, errors, model config."""
