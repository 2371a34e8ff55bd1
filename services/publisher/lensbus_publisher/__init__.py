"""lensbus publisher: the web page with each camera's device and project streams, live
results as Server-Sent Events, the durable result stream, and event rules with webhooks."""
