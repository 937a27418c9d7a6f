"""Dashboard page definitions, Jinja templates and static assets (bundled plotly.min.js).

Shipped as package data of ``spectrawatch_server.dashboards``; read by
``spectrawatch_server.api.routes.dashboards`` and rendered with
``spectrawatch_server.dashboards`` figure builders.
"""
