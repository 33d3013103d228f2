"""The HTTP captioning service: `capeen serve` runs `service.app.create_app` under uvicorn."""
