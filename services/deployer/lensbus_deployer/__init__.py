"""lensbus deployer: stores model packages in the JetStream object store ``lensbus-models``,
records the desired model of each camera group in the KV bucket ``lensbus-deployments``,
and answers the request/reply API on ``<prefix>.api.deployer.<verb>``."""
