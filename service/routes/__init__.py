"""The HTTP routes, one router per concern; `service.app` includes them all."""
