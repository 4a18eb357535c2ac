"""The SQLAlchemy catalog: models, engine, migrations and the queries the node and CLI use."""
