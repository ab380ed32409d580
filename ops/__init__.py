"""Custom operators, each with reference / cpu / ascend backends behind mindport.dispatch."""
