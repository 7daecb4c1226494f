"""The Flower apps: ``client_app.app`` (ClientApp), ``server_app.app`` (ServerApp).

Flower is imported only here and in the top-level ``strategies`` package. ``simulation`` holds
the one call into Flower's simulation engine that ``fedkn run`` uses.
"""
