"""The River rewrite: spec and manifest, the similarity gate, the twin-kind registry and the layouts
(nested ``If``, chained ``If``, segments) that all build from them."""
