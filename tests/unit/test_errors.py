from encfs.errors import Corruption


def test_corruption_names_file_and_offset():
    err = Corruption("/v/.tdefs/files.dict", 123, "bad MAC")
    assert "/v/.tdefs/files.dict" in str(err)
    assert "123" in str(err)
    assert err.offset == 123
