"""Wire models (pydantic) of every endpoint: the only wire contract. JSON Schemas in json/."""
