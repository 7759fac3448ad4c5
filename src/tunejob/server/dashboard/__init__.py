"""The dashboard: views (routes and login), job_sources (local run folders or the server's jobs),
pages (HTML), static (its CSS and JS)."""
