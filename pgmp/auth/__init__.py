"""Authentication: the auth file, client-side methods (trust/password/md5/SCRAM) and pgmp's own login to servers."""
