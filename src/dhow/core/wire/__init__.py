"""The Open Inference Protocol's wire forms below the doors: what the REST door, a stream consumer and any
other door that reads or writes v2 bodies share (``v2``: JSON and the binary tensor extension; ``tensors``:
a tensor's JSON ``data``; ``json_refusals``: what every door that reads JSON says of JSON it cannot parse)."""
