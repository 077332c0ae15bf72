"""The Dagster-free core: project settings, the prompt table and its sources, pricing and the
budget, planning and reporting, submission, and the polling tick that fetches each video."""
