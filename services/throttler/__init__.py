"""The throttler: learns what is normal for instances and acts on sustained outliers."""
