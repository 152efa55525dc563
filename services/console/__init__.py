"""The web console: the platform seen live in a browser, fed from its Kafka topics."""
