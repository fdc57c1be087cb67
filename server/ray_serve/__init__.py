"""stepimage on Ray Serve: the same FastAPI app and the same engine, spread over a Ray cluster.

- `options`: the application's arguments (`args:` of a Serve config file): `stepimage serve`'s settings by
  name plus the replica and autoscaling knobs. No Ray import.
- `remote`: `RemoteEngine`, the engine the ingress's app serves through; it sends each request to a model
  replica over a Serve handle and streams previews and the result back.
- `app`: the two deployments (ingress, model) and `build_app`, the builder a Serve config file names.

`stepimage serve` never imports this package; only these modules import Ray.
"""
