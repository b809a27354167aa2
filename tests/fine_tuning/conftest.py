"""The fine-tuning tests reuse the registry suite's throwaway PostgreSQL."""
